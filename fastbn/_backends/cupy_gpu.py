"""The CuPy backend: the CUDA kernels of ``fastbn/_kernels/bn_cuda.cu`` on CuPy arrays.

The source is compiled with :class:`cupy.RawModule` (NVRTC) once per device and
dtype, and kept; each call picks the kernel by name
(``bn_<kernel>_<dtype>_<i32|i64>``), computes grid and block from the shape,
allocates its outputs with CuPy on the input's device and launches on the
current stream. Nothing here touches the host: no synchronisation, no copy.

CuPy is an optional extra (``pip install fastbn[cupy]``) and is imported only
when a kernel first runs or :meth:`CupyBackend.is_available` is asked, so this
module imports everywhere; the planning helpers (:func:`index_type`,
:func:`plan_reduce_planes`, ...) are plain functions of shapes, testable
without a GPU.

Launch geometry (the kernels' side of it is described in ``bn_cuda.cu``):

* reductions (``stats``, ``backward_reduce``) on planes: a block per channel,
  and enough slices of each channel (``grid.y`` over ``O``, ``grid.z`` over
  ``I``) to fill the device twice over when there are few channels; on rows,
  blocks of 32 channels by up to 16 row slices per thread row, and row slices
  over ``grid.y``. A split reduction writes per-block partials to a workspace
  and the last block of each channel (group) merges them in the same launch.
* elementwise (``normalize``, ``backward_elemt``): 256 threads, ``grid.x``
  over the ``O*C`` runs (or the channel groups of rows), ``grid.y`` over ``I``
  (or the rows), at most 8 resident-block waves, the rest by grid-stride loops.
"""
import importlib.resources
import importlib.util
import threading

import numpy as np

from .._registry import Backend

# --- constants shared with bn_cuda.cu -------------------------------------------------

KERNEL_SOURCE = "bn_cuda.cu"
THREADS = 512               # threads per reduction block, at most (kMaxThreads in bn_cuda.cu)
ELEMENTWISE_THREADS = 256   # threads per elementwise block
UNROLL = 4                  # values per thread per step (kUnroll in bn_cuda.cu)
MAX_GRID_YZ = 65535         # CUDA's limit on gridDim.y and gridDim.z
MAX_GRID_X = 2**31 - 1      # CUDA's limit on gridDim.x
# Every grid stride (gridDim * blockDim along one walk) stays below this, so a
# 32-bit loop counter that runs UNROLL strides past an array of < 2^30 elements
# (the most an int32 byte extent allows for 16-bit data) cannot overflow.
MAX_STRIDE = 2**26
WAVES_REDUCE = 2            # reductions: split channels until the device is filled this often
WAVES_ELEMENTWISE = 8       # elementwise: grid at most this many full device loads

# data dtype -> stat dtype, for every dtype the kernels are instantiated for (one
# module each); bfloat16 arrays are ml_dtypes' (CuPy names their dtype "bfloat16")
STAT_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
              "float64": "float64"}
KERNELS = ("bn_stats_planes", "bn_stats_rows", "bn_normalize_planes", "bn_normalize_rows",
           "bn_backward_reduce_planes", "bn_backward_reduce_rows",
           "bn_backward_elemt_planes", "bn_backward_elemt_rows")
INDEX_TYPES = ("i32", "i64")

_INSTALL_HINT = "cupy is not installed (pip install fastbn[cupy])"


def kernel_name(kernel, dtype, index):
    """The extern "C" name of ``kernel`` for ``dtype`` data and ``index`` ("i32"/"i64")."""
    return f"{kernel}_{dtype}_{index}"


def kernel_names(dtype):
    """Every kernel name the module compiled for ``dtype`` holds (and this adapter launches)."""
    return [kernel_name(k, dtype, i) for k in KERNELS for i in INDEX_TYPES]


def compile_options(dtype):
    """The compiler options of the module for ``dtype``: only its instantiations.

    The float16 and bfloat16 modules include ``cuda_fp16.h`` / ``cuda_bf16.h``
    (bfloat16's brings the float16 header of its own release), found on the CUDA
    include paths CuPy adds to NVRTC's: a CUDA toolkit, or CuPy's ``[ctk]`` wheels.
    """
    flags = tuple(f"-DFASTBN_{name.upper()}={int(name == dtype)}" for name in STAT_DTYPE)
    return ("-std=c++17",) + flags


def kernel_source():
    """The text of ``fastbn/_kernels/bn_cuda.cu`` (package data), read once."""
    global _source
    if _source is None:
        _source = (importlib.resources.files("fastbn._kernels")
                   .joinpath(KERNEL_SOURCE).read_text(encoding="utf-8"))
    return _source


_source = None


# --- launch planning: pure functions of the shape --------------------------------------

def index_type(nbytes):
    """"i32" when an array of ``nbytes`` can be indexed with int, else "i64".

    The rule of cupyx.scipy.ndimage: 32-bit indices while the byte extent is
    below 2^31 (so every element index, and every loop counter that overshoots
    by at most ``UNROLL * MAX_STRIDE``, fits in an int).
    """
    return "i32" if nbytes < 2**31 else "i64"


def _cdiv(a, b):
    return -(-a // b)


def _pow2_at_least(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def plan_reduce_planes(O, C, I, sm_count, threads_per_sm=2048):
    """``(grid, block)`` of bn_stats_planes / bn_backward_reduce_planes for an (O, C, I) array.

    A block of 32..512 threads (a power of two, so whole warps) per channel
    slice; ``block.x`` along I, ``block.y`` along O. Few channels are split
    into ``grid.y`` slices of O and then ``grid.z`` slices of I until about
    ``WAVES_REDUCE`` device loads of blocks exist, keeping at least 4 chunks
    of UNROLL values per thread.
    """
    count = O * I
    threads = min(THREADS, max(32, _pow2_at_least(_cdiv(count, UNROLL))))
    bx = min(threads, _pow2_at_least(I))
    by = threads // bx
    target = WAVES_REDUCE * sm_count * max(1, threads_per_sm // threads)
    slices = max(1, min(_cdiv(target, C), count // (threads * UNROLL * 4)))
    gy = max(1, min(slices, _cdiv(O, by), MAX_GRID_YZ, MAX_STRIDE // by))
    gz = max(1, min(_cdiv(slices, gy), _cdiv(I, bx), MAX_GRID_YZ, MAX_STRIDE // bx))
    return (C, gy, gz), (bx, by, 1)


def plan_reduce_rows(O, C, sm_count, threads_per_sm=2048):
    """``(grid, block)`` of bn_stats_rows / bn_backward_reduce_rows for an (O, C) array.

    ``block.x`` = up to 32 consecutive channels (a warp reads a contiguous
    stretch of a row), ``block.y`` a power of two of rows; ``grid.x`` covers
    the channels, ``grid.y`` slices the rows until about ``WAVES_REDUCE``
    device loads of blocks exist, keeping at least 4 chunks per thread.
    """
    bx = min(32, _pow2_at_least(C))
    by = max(1, min(THREADS // bx, _pow2_at_least(_cdiv(O, UNROLL))))
    gx = _cdiv(C, bx)
    target = WAVES_REDUCE * sm_count * max(1, threads_per_sm // (bx * by))
    gy = max(1, min(_cdiv(target, gx), O // (by * UNROLL * 4), MAX_GRID_YZ, MAX_STRIDE // by))
    return (gx, gy, 1), (bx, by, 1)


def plan_elementwise_planes(R, I, sm_count, threads_per_sm=2048):
    """``(grid, block)`` of bn_normalize_planes / bn_backward_elemt_planes: R runs of I values."""
    bx = min(ELEMENTWISE_THREADS, _pow2_at_least(I))
    by = ELEMENTWISE_THREADS // bx
    cap = WAVES_ELEMENTWISE * sm_count * max(1, threads_per_sm // ELEMENTWISE_THREADS)
    gy = max(1, min(_cdiv(I, bx * UNROLL), MAX_GRID_YZ, cap, MAX_STRIDE // bx))
    gx = max(1, min(_cdiv(R, by), cap // gy, MAX_STRIDE // by))
    return (gx, gy, 1), (bx, by, 1)


def plan_elementwise_rows(O, C, sm_count, threads_per_sm=2048):
    """``(grid, block)`` of bn_normalize_rows / bn_backward_elemt_rows for an (O, C) array."""
    bx = min(32, _pow2_at_least(C))
    by = max(1, min(ELEMENTWISE_THREADS // bx, _pow2_at_least(_cdiv(O, UNROLL))))
    gx = _cdiv(C, bx)
    cap = WAVES_ELEMENTWISE * sm_count * max(1, threads_per_sm // (bx * by))
    gy = max(1, min(_cdiv(O, by * UNROLL), MAX_GRID_YZ, max(1, cap // gx), MAX_STRIDE // by))
    return (gx, gy, 1), (bx, by, 1)


# --- compiled modules and device facts, cached per device -------------------------------

_lock = threading.Lock()
_modules = {}     # (device id, dtype) -> cupy.RawModule
_functions = {}   # (device id, kernel name) -> kernel
_devices = {}     # device id -> (multiprocessor count, max resident threads per multiprocessor)


def _cupy():
    import cupy
    return cupy


def _module(cupy, device_id, dtype):
    key = (device_id, dtype)
    module = _modules.get(key)
    if module is None:
        with _lock:
            module = _modules.get(key)
            if module is None:
                module = cupy.RawModule(code=kernel_source(), options=compile_options(dtype))
                _modules[key] = module
    return module


def _function(cupy, device_id, dtype, kernel, index):
    """The compiled kernel; call with the input's device current."""
    name = kernel_name(kernel, dtype, index)
    key = (device_id, name)
    fn = _functions.get(key)
    if fn is None:
        fn = _module(cupy, device_id, dtype).get_function(name)  # compiles on first use
        _functions[key] = fn
    return fn


def _device_facts(cupy, device_id):
    facts = _devices.get(device_id)
    if facts is None:
        rt = cupy.cuda.runtime
        facts = (rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, device_id),
                 rt.deviceGetAttribute(rt.cudaDevAttrMaxThreadsPerMultiProcessor, device_id))
        _devices[device_id] = facts
    return facts


# --- the backend -------------------------------------------------------------------------

class _Call:
    """What every kernel call needs: cupy, the device (current while launching), types."""

    __slots__ = ("cupy", "device", "device_id", "dtype", "stat", "index", "idx", "sm",
                 "threads_per_sm")

    def __init__(self, x3):
        cupy = _cupy()
        self.cupy = cupy
        self.device_id = x3.data.device_id
        self.device = cupy.cuda.Device(self.device_id)
        self.dtype = x3.dtype.name
        self.stat = STAT_DTYPE[self.dtype]
        self.index = index_type(x3.nbytes)
        self.idx = np.int32 if self.index == "i32" else np.int64
        self.sm, self.threads_per_sm = _device_facts(cupy, self.device_id)

    def same_device(self, a, name):
        """``a`` itself, checked to live on x's device (a kernel cannot reach another's memory)."""
        if a.data.device_id != self.device_id:
            raise ValueError(f"{name}: expected an array on CUDA device {self.device_id} like x, "
                             f"got one on device {a.data.device_id} (fastbn never moves data "
                             f"between devices)")
        return a

    def vector(self, v, name):
        """A per-channel vector as the kernels read it: contiguous, stat dtype, x's device."""
        return self.cupy.ascontiguousarray(self.same_device(v, name), dtype=self.stat)

    def function(self, kernel):
        return _function(self.cupy, self.device_id, self.dtype, kernel, self.index)


class CupyBackend(Backend):
    """CUDA kernels through CuPy: CuPy arrays in, CuPy arrays out, on the input's device.

    No fused paths: a fused forward would have to keep a channel on chip
    between its statistics and its normalization, which the working sets that
    matter (hundreds of MB, against 50 MB of L2) do not allow, and smaller
    inputs already read the second pass from L2; so the core's composition of
    the four kernels (2 reads + 1 write forward, as cuDNN) is the best known
    cost here until a measurement says otherwise.
    """

    name = "cupy"
    priority = 100
    devices = frozenset({"cuda"})
    dtypes = frozenset({"float16", "bfloat16", "float32", "float64"})

    def is_available(self):
        if importlib.util.find_spec("cupy") is None:
            return False, _INSTALL_HINT
        try:
            cupy = _cupy()
        except Exception as exc:  # noqa: BLE001 - a broken install is a reason, not a crash
            return False, f"cupy failed to import: {type(exc).__name__}: {exc}"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - no driver, no device, ...
            return False, (f"no usable CUDA device (no NVIDIA driver or GPU?): "
                           f"{type(exc).__name__}: {exc}")
        if count < 1:
            return False, "no CUDA device found"
        try:
            cupy.cuda.nvrtc.getVersion()
        except Exception as exc:  # noqa: BLE001 - the kernels are compiled at run time
            return False, (f"NVRTC, which compiles fastbn's CUDA kernels, cannot be loaded "
                           f"(pip install cupy-cuda13x[ctk]): {type(exc).__name__}: {exc}")
        return True, ""

    # -- reductions --

    def _reduce(self, call, family_kernels, x_args, O, C, I, n_out, with_counts):
        """Launch a (possibly split) reduction; returns its ``n_out`` (C,) outputs."""
        cupy, idx = call.cupy, call.idx
        if I == 1:
            grid, block = plan_reduce_rows(O, C, call.sm, call.threads_per_sm)
            kernel, slices, tickets, dims = family_kernels[1], grid[1], grid[0], (idx(O), idx(C))
        else:
            grid, block = plan_reduce_planes(O, C, I, call.sm, call.threads_per_sm)
            kernel, slices, tickets = family_kernels[0], grid[1] * grid[2], C
            dims = (idx(O), idx(C), idx(I))
        outs = [cupy.empty(C, dtype=call.stat) for _ in range(n_out)]
        if slices > 1:
            parts = cupy.empty((n_out, C * slices), dtype=call.stat)
            work = ((cupy.empty(C * slices, dtype=np.int64),) if with_counts else ())
            work += tuple(parts[j] for j in range(n_out))
            work += (cupy.zeros(tickets, dtype=np.uint32),)
        else:  # one block per channel (group): outputs written directly, no workspace
            work = (None,) * (n_out + (1 if with_counts else 0) + 1)
        call.function(kernel)(grid, block, x_args + dims + tuple(outs) + work)
        return outs

    @staticmethod
    def _declines(x3):
        """Shapes no launch here covers: more planes channels than CUDA's grid.x allows."""
        O, C, I = x3.shape
        return I > 1 and C > MAX_GRID_X

    def stats(self, x3):
        """Per-channel mean and ``m2 = sum((x - mean)**2)``: Welford/Chan, one read of x."""
        if self._declines(x3):
            return NotImplemented
        call = _Call(x3)
        cupy = call.cupy
        O, C, I = x3.shape
        with call.device:
            if C == 0 or O * I == 0:  # nothing to launch; NumPy's answers for empty sets
                return cupy.full(C, np.nan, dtype=call.stat), cupy.zeros(C, dtype=call.stat)
            mean, m2 = self._reduce(call, ("bn_stats_planes", "bn_stats_rows"), (x3,), O, C, I,
                                    n_out=2, with_counts=True)
        return mean, m2

    def backward_reduce(self, dy3, x3, mean):
        """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``, one read of dy and x."""
        if self._declines(x3):
            return NotImplemented
        call = _Call(x3)
        cupy = call.cupy
        O, C, I = x3.shape
        with call.device:
            if C == 0 or O * I == 0:
                return cupy.zeros(C, dtype=call.stat), cupy.zeros(C, dtype=call.stat)
            args = (call.same_device(dy3, "dy"), x3, call.vector(mean, "mean"))
            sum_dy, sum_dy_xmu = self._reduce(
                call, ("bn_backward_reduce_planes", "bn_backward_reduce_rows"), args, O, C, I,
                n_out=2, with_counts=False)
        return sum_dy, sum_dy_xmu

    # -- elementwise --

    def _elementwise(self, call, kernels, args, O, C, I):
        idx = call.idx
        if I == 1:
            grid, block = plan_elementwise_rows(O, C, call.sm, call.threads_per_sm)
            call.function(kernels[1])(grid, block, args + (idx(O), idx(C)))
        else:
            grid, block = plan_elementwise_planes(O * C, I, call.sm, call.threads_per_sm)
            call.function(kernels[0])(grid, block, args + (idx(O * C), idx(C), idx(I)))

    def normalize(self, x3, mean, scale, shift, y3):
        """``y3 = (x3 - mean) * scale + shift``; ``y3`` may be ``x3`` itself."""
        call = _Call(x3)
        O, C, I = x3.shape
        if O * C * I == 0:
            return None
        with call.device:
            args = (x3, call.vector(mean, "mean"), call.vector(scale, "scale"),
                    call.vector(shift, "shift"), call.same_device(y3, "out"))
            self._elementwise(call, ("bn_normalize_planes", "bn_normalize_rows"), args, O, C, I)
        return None

    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        """``dx3 = k_dy * dy3 + k_x * (x3 - mean) + k_c``."""
        call = _Call(x3)
        O, C, I = x3.shape
        if O * C * I == 0:
            return None
        with call.device:
            args = (call.same_device(dy3, "dy"), x3, call.vector(mean, "mean"),
                    call.vector(k_dy, "k_dy"), call.vector(k_x, "k_x"), call.vector(k_c, "k_c"),
                    call.same_device(dx3, "dx"))
            self._elementwise(call, ("bn_backward_elemt_planes", "bn_backward_elemt_rows"),
                              args, O, C, I)
        return None


backend = CupyBackend()
