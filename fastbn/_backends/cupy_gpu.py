"""The CuPy backend: the CUDA kernels of ``fastbn/_kernels/bn_cuda.cu`` on CuPy arrays.

The source is compiled with :class:`cupy.RawModule` (NVRTC) once per device and
dtype, and kept; each call picks the kernel by name
(``bn_<kernel>_<dtype>_<i32|i64>``), computes grid and block from the shape,
allocates its outputs with CuPy on the input's device and launches on the
current stream. Nothing here touches the host: no synchronisation, no copy.

CuPy is an optional extra (``cupy``) and is imported only
when a kernel first runs or :meth:`CupyBackend.is_available` is asked, so this
module imports everywhere; the planning helpers (:func:`index_type`,
:func:`plan_reduce_planes`, ...) are plain functions of shapes, testable
without a GPU.

Launch geometry (the kernels' side of it is described in ``bn_cuda.cu``):

* reductions (``stats``, ``backward_reduce[_relu]``) on planes: a 1-D block of a
  multiple of 32 threads per channel slice, walking the channel's ``O*I``
  values as one flat range (no block sized to a power of two of ``I``), and
  enough slices per channel (``grid.y``) to fill the device twice over when
  there are few channels; on rows, the channels split into groups of equal
  width <= 32 (``C = 33``: two of 17), ``block.y`` a power of two of rows, and
  row slices over ``grid.y``. A split reduction writes per-block partials to a
  workspace and the last block of each channel (group) merges them in the same
  launch.
* elementwise (``normalize[_epilogue]``, ``backward_elemt[_relu]``): one flat
  grid-stride walk over the whole array, 1-D blocks of up to 256 threads, at
  most 8 resident-block waves.
* vector access (float4, double2, four 16-bit values) where every data pointer
  is aligned to a vector and ``I`` (planes) or ``C`` (rows) is a multiple of
  the vector width; one value at a time otherwise (:func:`vector_ok`).
* 32-bit indices while the element count leaves room for the loop counters'
  overshoot (:func:`index_type`), 64-bit ones past it.
"""
import importlib.resources
import importlib.util
import threading

import numpy as np

from .._hints import missing
from .._registry import Backend

# --- constants shared with bn_cuda.cu -------------------------------------------------

KERNEL_SOURCE = "bn_cuda.cu"
THREADS = 512               # threads per reduction block, at most (kMaxThreads in bn_cuda.cu)
ELEMENTWISE_THREADS = 256   # threads per elementwise block
UNROLL = 4                  # values per thread per step (kUnroll in bn_cuda.cu)
MAX_GRID_YZ = 65535         # CUDA's limit on gridDim.y and gridDim.z
MAX_GRID_X = 2**31 - 1      # CUDA's limit on gridDim.x
# Every grid stride (gridDim * blockDim along one walk, in vectors or values) stays
# at or below this; a loop counter runs at most UNROLL strides (+ UNROLL) past the
# end of its range before the loop test stops it (see index_type).
MAX_STRIDE = 2**22
# Arrays of fewer elements than this use the 32-bit index kernels: every index, and
# every loop counter that overshoots by UNROLL * (MAX_STRIDE + 1), fits in an int.
I32_MAX_ELEMENTS = 2**31 - 1 - UNROLL * (MAX_STRIDE + 1)
WAVES_REDUCE = 2            # reductions: split channels until the device is filled this often
WAVES_ELEMENTWISE = 8       # elementwise: grid at most this many full device loads

# data dtype -> stat dtype, for every dtype the kernels are instantiated for (one
# module each); bfloat16 arrays are ml_dtypes' (CuPy names their dtype "bfloat16")
STAT_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
              "float64": "float64"}
# values per vector access (VecWidth in bn_cuda.cu): 16 bytes of float32/float64 data,
# 8 bytes of 16-bit data
VECTOR_WIDTH = {"float16": 4, "bfloat16": 4, "float32": 4, "float64": 2}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
KERNELS = ("bn_stats_planes", "bn_stats_rows", "bn_normalize_planes", "bn_normalize_rows",
           "bn_backward_reduce_planes", "bn_backward_reduce_rows",
           "bn_backward_elemt_planes", "bn_backward_elemt_rows",
           # the epilogue kernels of the backend protocol (relu, residual)
           "bn_normalize_epilogue_planes", "bn_normalize_epilogue_rows",
           "bn_backward_reduce_relu_planes", "bn_backward_reduce_relu_rows",
           "bn_backward_elemt_relu_planes", "bn_backward_elemt_relu_rows")
INDEX_TYPES = ("i32", "i64")

_INSTALL_HINT = missing("cupy", "cupy-cuda13x", "cupy")


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

def index_type(size):
    """"i32" when an array of ``size`` elements can be indexed with int, else "i64".

    The switch is on the element count (the index range), whatever the dtype:
    every element index is below ``size``, and every loop counter stops at most
    ``UNROLL`` grid strides (of at most ``MAX_STRIDE``) plus ``UNROLL`` past the
    end of its range, so ``size < I32_MAX_ELEMENTS`` keeps all of them in an int.
    """
    return "i32" if size < I32_MAX_ELEMENTS else "i64"


def vector_ok(dtype, C, I, ptrs):
    """Whether the kernels may take the vector path for this call.

    Every data pointer (``ptrs``: device addresses of x, y, dy, ... ) must be
    aligned to a vector, and a vector must not straddle two runs: ``I`` a
    multiple of the vector width for planes (``I > 1``), ``C`` for rows.
    """
    width = VECTOR_WIDTH[dtype]
    extent = I if I > 1 else C
    return extent % width == 0 and all(p % (width * ITEMSIZE[dtype]) == 0 for p in ptrs)


def _cdiv(a, b):
    return -(-a // b)


def _pow2_at_least(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _pow2_at_most(n):
    return 1 << max(0, int(n).bit_length() - 1)


def _warps(n):
    """``n`` threads rounded up to whole warps."""
    return 32 * _cdiv(max(1, n), 32)


def plan_reduce_planes(O, C, I, sm_count, threads_per_sm=2048, vec=1):
    """``(grid, block)`` of bn_stats_planes / bn_backward_reduce[_relu]_planes.

    For an (O, C, I) array walked ``vec`` values at a time (``I % vec == 0``):
    a 1-D block of whole warps (at most 512 threads) per channel slice, whose
    threads walk the channel's ``O*I/vec`` vectors as one flat grid-stride
    range, so a thread idles only in the last step of the walk; of the block
    sizes between half the largest useful one and it, the one that leaves the
    fewest thread-steps idle in that last step (the largest among near ties).
    Few channels are split into ``grid.y`` slices until about ``WAVES_REDUCE``
    device loads of blocks exist, keeping at least 4 steps of UNROLL vectors
    per thread.
    """
    count = O * (I // vec)
    largest = min(THREADS, _warps(_cdiv(count, UNROLL)))
    best = None
    for threads in range(largest, max(32, largest // 2) - 1, -32):
        target = WAVES_REDUCE * sm_count * max(1, threads_per_sm // threads)
        slices = max(1, min(_cdiv(target, C), count // (threads * UNROLL * 4), MAX_GRID_YZ,
                            MAX_STRIDE // threads))
        lanes = threads * slices
        idle = 1 - count / (lanes * _cdiv(count, lanes))
        if best is None or idle < best[0] - 0.02:
            best = (idle, threads, slices)
    _, threads, slices = best
    return (C, slices, 1), (threads, 1, 1)


def plan_reduce_rows(O, C, sm_count, threads_per_sm=2048, vec=1):
    """``(grid, block)`` of bn_stats_rows / bn_backward_reduce[_relu]_rows for an (O, C) array.

    A thread holds ``vec`` consecutive channels (``C % vec == 0``); the
    ``C/vec`` columns are split into ``grid.x`` groups of equal width
    ``block.x <= 32`` (a warp reads a contiguous stretch of a row; ``C = 33``
    makes two groups of 17, not one of 32 and one of 1), ``block.y`` a power
    of two of rows; ``grid.y`` slices the rows until about ``WAVES_REDUCE``
    device loads of blocks exist, keeping at least 4 chunks per thread.
    """
    columns = C // vec
    gx = _cdiv(columns, 32)
    bx = _cdiv(columns, gx)
    by = max(1, min(_pow2_at_most(THREADS // bx), _pow2_at_least(_cdiv(O, UNROLL))))
    target = WAVES_REDUCE * sm_count * max(1, threads_per_sm // _warps(bx * by))
    gy = max(1, min(_cdiv(target, gx), O // (by * UNROLL * 4), MAX_GRID_YZ, MAX_STRIDE // by))
    return (gx, gy, 1), (bx, by, 1)


def plan_elementwise(n, sm_count, threads_per_sm=2048, vec=1):
    """``(grid, block)`` of the elementwise kernels (both families) for ``n`` elements.

    One flat grid-stride walk over the ``n/vec`` vectors: 1-D blocks of
    ``ELEMENTWISE_THREADS`` (fewer, in whole warps, for tiny arrays), at most
    ``WAVES_ELEMENTWISE`` device loads of blocks, UNROLL vectors per thread
    per step.
    """
    vectors = n // vec
    threads = min(ELEMENTWISE_THREADS, _warps(_cdiv(vectors, UNROLL)))
    cap = WAVES_ELEMENTWISE * sm_count * max(1, threads_per_sm // threads)
    gx = max(1, min(_cdiv(vectors, threads * UNROLL), cap, MAX_STRIDE // threads))
    return (gx, 1, 1), (threads, 1, 1)


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
        self.index = index_type(x3.size)
        self.idx = np.int32 if self.index == "i32" else np.int64
        self.sm, self.threads_per_sm = _device_facts(cupy, self.device_id)

    def same_device(self, a, name):
        """``a`` itself, checked to live on x's device (a kernel cannot reach another's memory)."""
        if a.data.device_id != self.device_id:
            raise ValueError(f"{name}: expected an array on CUDA device {self.device_id} like x, "
                             f"got one on device {a.data.device_id} (fastbn never moves data "
                             f"between devices)")
        return a

    def optional(self, a, name):
        """``same_device(a)``, or None (a null pointer: the kernel skips that array)."""
        return None if a is None else self.same_device(a, name)

    def vector(self, v, name):
        """A per-channel vector as the kernels read it: contiguous, stat dtype, x's device."""
        return self.cupy.ascontiguousarray(self.same_device(v, name), dtype=self.stat)

    def vec(self, C, I, arrays):
        """The vector width for these data arrays (None: absent), or 1 (scalar path)."""
        ptrs = [a.data.ptr for a in arrays if a is not None]
        return VECTOR_WIDTH[self.dtype] if vector_ok(self.dtype, C, I, ptrs) else 1

    def function(self, kernel):
        return _function(self.cupy, self.device_id, self.dtype, kernel, self.index)


class CupyBackend(Backend):
    """CUDA kernels through CuPy: CuPy arrays in, CuPy arrays out, on the input's device.

    No fused paths: a fused forward would have to keep a channel on chip
    between its statistics and its normalization, which the working sets that
    matter (hundreds of MB, against 50 MB of L2) do not allow, and smaller
    inputs already read the second pass from L2; so the core's composition of
    the four kernels (2 reads + 1 write forward, as cuDNN) is the best known
    cost here until a measurement says otherwise. The epilogue kernels of the
    protocol (relu, residual) are served: ``normalize_epilogue``,
    ``backward_reduce_relu`` and ``backward_elemt_relu`` (the fused-path
    epilogues need the fused paths, so they stay None).
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

    def _reduce(self, call, family_kernels, data, x_args, O, C, I, n_out, with_counts):
        """Launch a (possibly split) reduction; returns its ``n_out`` (C,) outputs.

        ``data`` are the data arrays read (for the vector-path check), ``x_args``
        the kernel's leading arguments."""
        cupy, idx = call.cupy, call.idx
        vec = call.vec(C, I, data)
        if I == 1:
            grid, block = plan_reduce_rows(O, C, call.sm, call.threads_per_sm, vec)
            kernel, slices, tickets, dims = family_kernels[1], grid[1], grid[0], (idx(O), idx(C))
        else:
            grid, block = plan_reduce_planes(O, C, I, call.sm, call.threads_per_sm, vec)
            kernel, slices, tickets = family_kernels[0], grid[1], C
            dims = (idx(O), idx(C), idx(I))
        outs = [cupy.empty(C, dtype=call.stat) for _ in range(n_out)]
        if slices > 1:
            parts = cupy.empty((n_out, C * slices), dtype=call.stat)
            work = ((cupy.empty(C * slices, dtype=np.int64),) if with_counts else ())
            work += tuple(parts[j] for j in range(n_out))
            work += (cupy.zeros(tickets, dtype=np.uint32),)
        else:  # one block per channel (group): outputs written directly, no workspace
            work = (None,) * (n_out + (1 if with_counts else 0) + 1)
        call.function(kernel)(grid, block,
                              x_args + dims + tuple(outs) + work + (np.int32(vec > 1),))
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
            mean, m2 = self._reduce(call, ("bn_stats_planes", "bn_stats_rows"), (x3,), (x3,),
                                    O, C, I, n_out=2, with_counts=True)
        return mean, m2

    def backward_reduce(self, dy3, x3, mean):
        """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``, one read of dy and x."""
        return self._backward_reduce(dy3, None, x3, mean)

    def backward_reduce_relu(self, dy3, y3, x3, mean):
        """``backward_reduce`` of ``g = dy where y3 > 0 else 0`` (the relu epilogue's gradient)."""
        return self._backward_reduce(dy3, y3, x3, mean)

    def _backward_reduce(self, dy3, y3, x3, mean):
        if self._declines(x3):
            return NotImplemented
        call = _Call(x3)
        cupy = call.cupy
        O, C, I = x3.shape
        with call.device:
            if C == 0 or O * I == 0:
                return cupy.zeros(C, dtype=call.stat), cupy.zeros(C, dtype=call.stat)
            dy3 = call.same_device(dy3, "dy")
            if y3 is None:
                kernels, data = ("bn_backward_reduce_planes", "bn_backward_reduce_rows"), (dy3, x3)
            else:
                kernels = ("bn_backward_reduce_relu_planes", "bn_backward_reduce_relu_rows")
                data = (dy3, call.same_device(y3, "y"), x3)
            sum_dy, sum_dy_xmu = self._reduce(call, kernels, data,
                                              data + (call.vector(mean, "mean"),), O, C, I,
                                              n_out=2, with_counts=False)
        return sum_dy, sum_dy_xmu

    # -- elementwise --

    def _elementwise(self, call, kernels, data, args, O, C, I):
        """Launch an elementwise kernel: ``args`` then the shape and the vector flag."""
        idx = call.idx
        n = O * C * I
        vec = call.vec(C, I, data)
        grid, block = plan_elementwise(n, call.sm, call.threads_per_sm, vec)
        dims = (idx(n), idx(C)) if I == 1 else (idx(n), idx(C), idx(I))
        call.function(kernels[0 if I > 1 else 1])(grid, block, args + dims + (np.int32(vec > 1),))

    def normalize(self, x3, mean, scale, shift, y3):
        """``y3 = (x3 - mean) * scale + shift``; ``y3`` may be ``x3`` itself."""
        return self._normalize(("bn_normalize_planes", "bn_normalize_rows"), x3, mean, scale,
                               shift, None, None, y3)

    def normalize_epilogue(self, x3, mean, scale, shift, z3, relu, y3):
        """``y3 = act((x3 - mean) * scale + shift [+ z3])``, act = relu or identity."""
        return self._normalize(("bn_normalize_epilogue_planes", "bn_normalize_epilogue_rows"),
                               x3, mean, scale, shift, z3, bool(relu), y3)

    def _normalize(self, kernels, x3, mean, scale, shift, z3, relu, y3):
        """The plain kernels take no z/relu arguments (``relu`` None), the epilogue ones do."""
        call = _Call(x3)
        O, C, I = x3.shape
        if O * C * I == 0:
            return None
        with call.device:
            z3, y3 = call.optional(z3, "z"), call.same_device(y3, "out")
            vectors = (call.vector(mean, "mean"), call.vector(scale, "scale"),
                       call.vector(shift, "shift"))
            if relu is None:
                args = (x3,) + vectors + (y3,)
            else:
                args = (x3, z3) + vectors + (np.int32(relu), y3)
            self._elementwise(call, kernels, (x3, z3, y3), args, O, C, I)
        return None

    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        """``dx3 = k_dy * dy3 + k_x * (x3 - mean) + k_c``."""
        return self._backward_elemt(dy3, None, x3, mean, k_dy, k_x, k_c, None, dx3)

    def backward_elemt_relu(self, dy3, y3, x3, mean, k_dy, k_x, k_c, dz3, dx3):
        """``backward_elemt`` of ``g = dy where y3 > 0 else 0``; ``dz3 = g`` unless None."""
        return self._backward_elemt(dy3, y3, x3, mean, k_dy, k_x, k_c, dz3, dx3)

    def _backward_elemt(self, dy3, y3, x3, mean, k_dy, k_x, k_c, dz3, dx3):
        """The plain kernels (``y3`` None) take no y/dz arguments, the relu ones do."""
        call = _Call(x3)
        O, C, I = x3.shape
        if O * C * I == 0:
            return None
        with call.device:
            dy3, dx3 = call.same_device(dy3, "dy"), call.same_device(dx3, "dx")
            constants = (call.vector(mean, "mean"), call.vector(k_dy, "k_dy"),
                         call.vector(k_x, "k_x"), call.vector(k_c, "k_c"))
            if y3 is None:
                kernels = ("bn_backward_elemt_planes", "bn_backward_elemt_rows")
                data, args = (dy3, x3, dx3), (dy3, x3) + constants + (dx3,)
            else:
                kernels = ("bn_backward_elemt_relu_planes", "bn_backward_elemt_relu_rows")
                y3, dz3 = call.same_device(y3, "y"), call.optional(dz3, "dz")
                data = (dy3, y3, x3, dz3, dx3)
                args = (dy3, y3, x3) + constants + (dz3, dx3)
            self._elementwise(call, kernels, data, args, O, C, I)
        return None


backend = CupyBackend()
