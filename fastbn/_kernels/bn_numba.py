"""Numba kernels of fastbn: the Cython + OpenMP kernels (``_bn_omp.pyx``), rewritten
as ``@njit`` functions, same structure and same names.

This module holds only math on C-contiguous buffers; it imports numba, so
import it lazily (``fastbn._backends.numba_cpu`` does). Every kernel takes
``n_threads`` resolved by the caller (``fastbn._threads``), applies it with
``numba.set_num_threads`` (thread-local in numba, capped at
``numba.config.NUMBA_NUM_THREADS``) and runs without the GIL.

Data arrays are the canonical ``(O, C, I)`` view, C-contiguous, of float32,
float64, or a 16-bit format passed as its bit pattern (numba has no 16-bit float
arithmetic on the CPU), the integer type of the view naming the format:

* float16 (IEEE binary16) as ``uint16`` (``x.view(np.uint16)``),
* bfloat16 (the upper half of a float32) as ``int16`` (``x.view(np.int16)``;
  the sign of the integer type only tags the format, the bits are read
  unsigned).

Per-channel vectors have the stat dtype: float32 for float16/bfloat16/float32
data, float64 for float64 data. 16-bit data is converted to float32 on load
(exactly) and rounded back (to nearest even) on store, one element at a time
inside the loops (``_load`` / ``_store``), so every loop is written once for
the four data types; the conversion is picked at compile time from the
array's element type, so each format is its own specialization and the
float32/float64 code is untouched by it.

Two kernel families, as in the Cython module:

* planes (``I > 1``): the array is one flat range of ``O*C`` contiguous
  planes of ``I`` values; each thread takes one contiguous slice of that range
  (memory order, cut anywhere, even inside a plane). Reductions keep
  per-thread, per-channel partial states that are merged at the end (Chan).
* rows (``I == 1``): the array is ``(O, C)``; statistics keep partial sums of
  a block of channels in an L1-resident array across a tile of rows, threads
  split the rows (or, with few rows, the channels).

Epilogues (``normalize_epilogue``, ``forward_train_epilogue``,
``backward_reduce_relu``, ``backward_elemt_relu``): the element-wise loops finish
each value with a residual add and a relu, ``y = relu((x - mean)*scale + shift
+ z)`` computed in the compute type and rounded once, and the backward loops
mask ``dy`` by relu's gradient from the saved output (``dy`` where ``y > 0``,
else 0) and may store that to ``dz``: the same loops and passes as the plain
kernels. The flags reach the loops as literal bools (each thread-team kernel is
made per combination of flags, holding them as constants: ``_by_flags``), so
every combination is its own specialization, compiled on its first use (the
plain kernels are the one without any); an absent array
travels as a dummy of the same type (``x`` for ``z``, ``dy`` for ``y``, ``dx``
for ``dz``) that is never touched.

Where the Cython module passes pointers, these functions pass the 1-D array
and a slice of it (``x[pos:pos + n]``, a view): the loops then index from 0,
which lets LLVM drop numba's negative-index checks and vectorise.

Compile options: ``parallel=True`` on the thread-team kernels only (the
helpers are plain ``@njit`` functions that LLVM inlines), ``cache=True``
everywhere (compiled once per signature, then loaded from ``__pycache__``),
``nogil=True``. ``fastmath`` is limited to ``reassoc`` (element-type partial
sums of one tile of <= 2048 values may be added in vector lanes, as the C
loops do by hand) and ``contract`` (fused multiply-add); never ``nnan`` /
``ninf``, so NaN and inf keep IEEE semantics and stay in their channel.
"""
import ctypes
import ctypes.util
import itertools
import mmap
import sys

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# Values per reduction tile: 2048 float32 = 8 KiB, inside the 8-32 KiB range
# that measured best (1 KiB tiles were 1.7x slower); also bounds the float32
# partial sums of a tile to 2048 values.
TILE = 2048
# Rows per tile in the rows family: every tile costs one Chan merge per channel.
ROW_TILE = 256
# Channels per block in the rows statistics: two arrays of partial sums in L1.
WIDE = 1024
# Values per prefetch step in the fused paths' reductions (a line per 64 bytes).
PF_STEP = 256
# Values per run of the rows element-wise kernels (constants tiled to this period).
ROW_SPAN = 1024
# Below this many elements per thread, a thread team costs more than it saves.
MIN_PER_THREAD = 32768
# Fused per-channel paths re-read a channel from L2 (1 MiB per core here), so
# they are taken only when the bytes one channel reads fit in it with room.
FUSE_MAX_BYTES = 786432

# Values per 16-bit (float16/bfloat16) staging buffer (outputs computed in float32, rounded
# here, then streamed out); small, so the stage and the input rarely alias
# modulo 4 KiB (1024 values: 1.4x slower than 128).
STAGE = 128
# Outputs smaller than this are written with ordinary stores: they fit in the
# last-level cache and whoever reads them next finds them there.
STREAM_MIN_BYTES = 1 << 20

_FM_REDUCE = {"reassoc", "contract"}
_FM_ELEMT = {"contract"}

_jit = dict(cache=True, nogil=True)


def _load_mincore():
    """libc's mincore (Linux), to tell touched pages from fresh ones; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    fn.restype = ctypes.c_int
    return fn


_mincore = _load_mincore()
_PAGE = mmap.PAGESIZE


# ----------------------------------------------------------------------------
# float16 <-> float32 (bit manipulation; exact, round-to-nearest-even)
# ----------------------------------------------------------------------------

@intrinsic
def _u32_as_f32(typingctx, v):
    """Reinterpret the bits of a uint32 as a float32."""
    if v != types.uint32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, v):
    """Reinterpret the bits of a float32 as a uint32."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@njit(**_jit)
def _half_to_float(h):
    """F. Giesen's half_to_float_fast5 (as fbn_half_to_float in _bn_simd.h):
    exact for every half, incl. subnormals and inf/nan."""
    o = np.uint32(np.uint32(h) & np.uint32(0x7fff)) << np.uint32(13)
    e = o & np.uint32(0x0f800000)                      # 0x7c00 << 13
    o = np.uint32(o + np.uint32(0x38000000))           # (127 - 15) << 23
    if e == np.uint32(0x0f800000):
        o = np.uint32(o + np.uint32(0x38000000))       # inf / nan: (128 - 16) << 23
    elif e == np.uint32(0):
        o = np.uint32(o + np.uint32(0x00800000))       # zero / subnormal
        o = _f32_as_u32(_u32_as_f32(o) - np.float32(6.103515625e-05))  # magic = 2**-14
    o = np.uint32(o | np.uint32(np.uint32(np.uint32(h) & np.uint32(0x8000)) << np.uint32(16)))
    return _u32_as_f32(o)


@njit(**_jit)
def _float_to_half(x):
    """F. Giesen's float_to_half_fast3_rtne (as fbn_float_to_half): round to
    nearest, ties to even, overflow to inf, nan stays nan; numpy's rounding."""
    u = _f32_as_u32(np.float32(x))
    sign = u & np.uint32(0x80000000)
    u = np.uint32(u ^ sign)
    if u >= np.uint32(0x47800000):                     # f16max = (127 + 16) << 23
        o = np.uint32(0x7e00) if u > np.uint32(0x7f800000) else np.uint32(0x7c00)
    elif u < np.uint32(0x38800000):                    # 113 << 23: half subnormals
        f = _u32_as_f32(u) + np.float32(0.5)           # denorm_magic = 126 << 23 = 0.5f
        o = np.uint32(_f32_as_u32(f) - np.uint32(0x3f000000))
    else:
        mant_odd = np.uint32(u >> np.uint32(13)) & np.uint32(1)
        u = np.uint32(u + np.uint32(0xc8000fff))       # ((15 - 127) << 23) + 0xfff, mod 2**32
        u = np.uint32(u + mant_odd)
        o = np.uint32(u >> np.uint32(13))
    return np.uint16(o | np.uint32(sign >> np.uint32(16)))


# ----------------------------------------------------------------------------
# bfloat16 <-> float32 (bit manipulation; exact, round-to-nearest-even)
# ----------------------------------------------------------------------------

@njit(**_jit)
def _bfloat16_to_float(h):
    """bfloat16 bits (int16 or uint16) -> float32: they are the upper 16 bits of
    the float32, so the conversion is exact for every pattern (subnormals,
    inf, NaN with its payload)."""
    return _u32_as_f32(np.uint32(np.uint32(np.uint16(h)) << np.uint32(16)))


@njit(**_jit)
def _float_to_bfloat16(x):
    """float32 -> bfloat16 bits (uint16), rounded to nearest, ties to even, as
    ml_dtypes (``float32_array.astype(ml_dtypes.bfloat16)``): finite values
    that round past the largest bfloat16 become inf (the carry runs into the
    exponent), inf stays inf, NaN becomes the quiet NaN of its sign (0x7fc0 /
    0xffc0; the payload is dropped, as ml_dtypes does). Branch-free but for a
    select, so loops storing bfloat16 vectorise."""
    u = _f32_as_u32(np.float32(x))
    lsb = np.uint32(np.uint32(u >> np.uint32(16)) & np.uint32(1))
    r = np.uint32(np.uint32(u + np.uint32(0x7fff)) + lsb) >> np.uint32(16)
    if np.uint32(u & np.uint32(0x7fffffff)) > np.uint32(0x7f800000):
        r = np.uint32(np.uint32(np.uint32(u >> np.uint32(16)) & np.uint32(0x8000))
                      | np.uint32(0x7fc0))
    return np.uint16(r)


@intrinsic
def _prefetch(typingctx, a, i):
    """Prefetch the cache line of a[i] into L1 (no fault past the end)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0")
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(a, types.intp), codegen


@intrinsic
def _address(typingctx, a):
    """The address of a's first element, as an integer."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))
    return types.uint64(a), codegen


@intrinsic
def _stream_line(typingctx, dst, di, src, si):
    """Copy the 64 bytes at src[si:] to dst[di:] (64-byte aligned) with a
    non-temporal store: the line goes to memory without being read first
    (no read-for-ownership) and without evicting the inputs from cache."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array)):
        return None

    def codegen(context, builder, sig, args):
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s_ = context.make_array(sig.args[2])(context, builder, args[2])
        vec = ir.VectorType(ir.IntType(32), 16)
        src_p = builder.bitcast(builder.gep(s_.data, [args[3]]), vec.as_pointer())
        dst_p = builder.bitcast(builder.gep(d.data, [args[1]]), vec.as_pointer())
        value = builder.load(src_p, align=1)
        store = builder.store(value, dst_p, align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(
            ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(dst, types.intp, src, types.intp), codegen


def _line_ptr(context, builder, aryty, ary, idx):
    """Pointer to the 64-byte vector at ary[idx:]: (pointer, vector type)."""
    a = context.make_array(aryty)(context, builder, ary)
    elem = context.get_value_type(aryty.dtype)
    vec = ir.VectorType(elem, 64 // context.get_abi_sizeof(elem))
    return builder.bitcast(builder.gep(a.data, [idx]), vec.as_pointer()), vec


def _splat(builder, vec, value):
    v = ir.Constant(vec, ir.Undefined)
    for lane in range(vec.count):
        v = builder.insert_element(v, value, ir.Constant(ir.IntType(32), lane))
    return v


def _store_nt(builder, value, ptr):
    store = builder.store(value, ptr, align=64)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(
        ir.IntType(32), 1)]))


def _is_float_array(a):
    return isinstance(a, types.Array) and a.dtype in (types.float32, types.float64)


def _literal_flags(*flags):
    """The values of epilogue flags typed as literal bools, or None (typing: the
    flags pick the code at compile time, so they must be literal)."""
    if not all(isinstance(f, types.BooleanLiteral) for f in flags):
        return None
    return tuple(f.literal_value for f in flags)


def _act_line(context, builder, sig, args, v, zi, i, add, relu):
    """The forward epilogue on one line v: v + z[i:] (z: argument zi) when add,
    then relu when relu (a select on v < 0: NaN stays NaN)."""
    if add:
        zp, _ = _line_ptr(context, builder, sig.args[zi], args[zi], i)
        v = builder.fadd(v, builder.load(zp, align=1))
    if relu:
        zero = ir.Constant(v.type, None)
        v = builder.select(builder.fcmp_ordered("<", v, zero), zero, v)
    return v


def _grad_line(context, builder, sig, args, gp, yi, dzi, i, relu, wdz):
    """The gradient one line of dy (at gp) carries: dy where y[i:] > 0, else 0
    (y: argument yi) when relu; stored to dz[i:] (argument dzi, ordinary
    stores) when wdz."""
    g = builder.load(gp, align=1)
    if relu:
        yp, _ = _line_ptr(context, builder, sig.args[yi], args[yi], i)
        zero = ir.Constant(g.type, None)
        g = builder.select(builder.fcmp_ordered(">", builder.load(yp, align=1), zero), g, zero)
    if wdz:
        dzp, _ = _line_ptr(context, builder, sig.args[dzi], args[dzi], i)
        builder.store(g, dzp, align=1)
    return g


@intrinsic
def _nt_affine(typingctx, x, y, z, i, m, s, b, add, relu):
    """One 64-byte line: y[i:] = act((x[i:] - m)*s + b [+ z[i:]]), streamed (y + i
    aligned); add, relu: literal flags of the epilogue (see _affine)."""
    flags = _literal_flags(add, relu)
    if not (_is_float_array(x) and y.dtype == x.dtype) or flags is None:
        return None

    def codegen(context, builder, sig, args):
        xp, vec = _line_ptr(context, builder, sig.args[0], args[0], args[3])
        yp, _ = _line_ptr(context, builder, sig.args[1], args[1], args[3])
        v = builder.fsub(builder.load(xp, align=1), _splat(builder, vec, args[4]))
        v = builder.fadd(builder.fmul(v, _splat(builder, vec, args[5])),
                         _splat(builder, vec, args[6]))
        _store_nt(builder, _act_line(context, builder, sig, args, v, 2, args[3], *flags), yp)
        return context.get_dummy_value()
    return types.void(x, y, z, types.intp, x.dtype, x.dtype, x.dtype, add, relu), codegen


@intrinsic
def _nt_elemt(typingctx, dy, x, dx, i, m, a, b, c, y, dz, relu, wdz):
    """One 64-byte line: dx[i:] = a*g + (b*(x[i:] - m) + c), streamed, g = dy[i:]
    masked by relu's gradient and stored to dz[i:] as the literal flags relu, wdz
    say (see _elemt)."""
    flags = _literal_flags(relu, wdz)
    if not (_is_float_array(x) and dy.dtype == x.dtype and dx.dtype == x.dtype) \
            or flags is None:
        return None

    def codegen(context, builder, sig, args):
        gp, vec = _line_ptr(context, builder, sig.args[0], args[0], args[3])
        xp, _ = _line_ptr(context, builder, sig.args[1], args[1], args[3])
        dp, _ = _line_ptr(context, builder, sig.args[2], args[2], args[3])
        g = _grad_line(context, builder, sig, args, gp, 8, 9, args[3], *flags)
        xm = builder.fsub(builder.load(xp, align=1), _splat(builder, vec, args[4]))
        v = builder.fadd(builder.fmul(_splat(builder, vec, args[6]), xm),
                         _splat(builder, vec, args[7]))
        v = builder.fadd(builder.fmul(_splat(builder, vec, args[5]), g), v)
        _store_nt(builder, v, dp)
        return context.get_dummy_value()
    t = x.dtype
    return types.void(dy, x, dx, types.intp, t, t, t, t, y, dz, relu, wdz), codegen


@intrinsic
def _nt_rows_affine(typingctx, x, y, z, i, m, s, b, j, add, relu):
    """One 64-byte line of a rows run: y[i:] = act((x[i:] - m[j:])*s[j:] + b[j:]
    [+ z[i:]]), streamed (see _nt_affine)."""
    flags = _literal_flags(add, relu)
    if not (_is_float_array(x) and y.dtype == x.dtype and m.dtype == x.dtype) \
            or flags is None:
        return None

    def codegen(context, builder, sig, args):
        xp, vec = _line_ptr(context, builder, sig.args[0], args[0], args[3])
        yp, _ = _line_ptr(context, builder, sig.args[1], args[1], args[3])
        mp, _ = _line_ptr(context, builder, sig.args[4], args[4], args[7])
        sp, _ = _line_ptr(context, builder, sig.args[5], args[5], args[7])
        bp, _ = _line_ptr(context, builder, sig.args[6], args[6], args[7])
        v = builder.fsub(builder.load(xp, align=1), builder.load(mp, align=1))
        v = builder.fadd(builder.fmul(v, builder.load(sp, align=1)), builder.load(bp, align=1))
        _store_nt(builder, _act_line(context, builder, sig, args, v, 2, args[3], *flags), yp)
        return context.get_dummy_value()
    return types.void(x, y, z, types.intp, m, s, b, types.intp, add, relu), codegen


@intrinsic
def _nt_rows_elemt(typingctx, dy, x, dx, i, m, a, b, c, j, y, dz, relu, wdz):
    """One 64-byte line of a rows run: dx = a*g + (b*(x - m) + c), constants at
    [j:], g as in _nt_elemt."""
    flags = _literal_flags(relu, wdz)
    if not (_is_float_array(x) and dy.dtype == x.dtype and m.dtype == x.dtype) \
            or flags is None:
        return None

    def codegen(context, builder, sig, args):
        gp, vec = _line_ptr(context, builder, sig.args[0], args[0], args[3])
        xp, _ = _line_ptr(context, builder, sig.args[1], args[1], args[3])
        dp, _ = _line_ptr(context, builder, sig.args[2], args[2], args[3])
        mp, _ = _line_ptr(context, builder, sig.args[4], args[4], args[8])
        ap, _ = _line_ptr(context, builder, sig.args[5], args[5], args[8])
        bp, _ = _line_ptr(context, builder, sig.args[6], args[6], args[8])
        cp, _ = _line_ptr(context, builder, sig.args[7], args[7], args[8])
        g = _grad_line(context, builder, sig, args, gp, 9, 10, args[3], *flags)
        xm = builder.fsub(builder.load(xp, align=1), builder.load(mp, align=1))
        v = builder.fadd(builder.fmul(builder.load(bp, align=1), xm), builder.load(cp, align=1))
        v = builder.fadd(builder.fmul(builder.load(ap, align=1), g), v)
        _store_nt(builder, v, dp)
        return context.get_dummy_value()
    return types.void(dy, x, dx, types.intp, m, a, b, c, types.intp, y, dz, relu, wdz), codegen


@intrinsic
def _store_fence(typingctx):
    """Order the streaming stores before whatever this thread writes next
    (a full fence: sfence's job, written portably)."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


# --- typed loads and stores: the data type picks the implementation at compile time ---

def _load(a, i):
    """a[i] in the compute type (float32 for float16/bfloat16/float32 data,
    float64 for float64)."""


def _store(a, i, v):
    """a[i] = v, rounded to the data type."""


def _ctype(a, v):
    """v converted to the compute type of data a (for a stat-dtype vector: its dtype)."""


def _is_half(a):
    """float16 data: its bits as uint16."""
    return isinstance(a, types.Array) and a.dtype == types.uint16


def _is_bfloat16(a):
    """bfloat16 data: its bits as int16."""
    return isinstance(a, types.Array) and a.dtype == types.int16


def _is_16bit(a):
    """16-bit float data (float16 or bfloat16): computed in float32, staged on store."""
    return _is_half(a) or _is_bfloat16(a)


@overload(_load, jit_options=_jit)
def _ov_load(a, i):
    if _is_half(a):
        return lambda a, i: _half_to_float(a[i])
    if _is_bfloat16(a):
        return lambda a, i: _bfloat16_to_float(a[i])
    return lambda a, i: a[i]


@overload(_store, jit_options=_jit)
def _ov_store(a, i, v):
    if _is_half(a):
        def impl(a, i, v):
            a[i] = _float_to_half(v)
        return impl
    if _is_bfloat16(a):
        def impl(a, i, v):
            a[i] = np.int16(_float_to_bfloat16(v))
        return impl

    def impl(a, i, v):
        a[i] = v
    return impl


@overload(_ctype, jit_options=_jit)
def _ov_ctype(a, v):
    if isinstance(a, types.Array) and a.dtype == types.float64:
        return lambda a, v: np.float64(v)
    return lambda a, v: np.float32(v)


# --- epilogues: y = act(bn(x) [+ z]) and its gradient, one value at a time ------
#
# The flags (add: z is given; relu; wdz: dz is given) reach the loops as literal
# bools (the thread-team kernels hold them as constants, see _by_flags), so each
# combination is its own specialization with the unused steps compiled out, and
# the plain kernels are the all-False one. An absent z, y or dz travels as a
# dummy array of the same type (x, dy, dx), never read or written (but typed:
# dead branches are still typed, so dz's dummy is writable).

def _zero(v):
    """0 in v's (float) type."""


@overload(_zero, jit_options=_jit)
def _ov_zero(v):
    zero = np.float64(0) if v == types.float64 else np.float32(0)
    return lambda v: zero


@njit(**_jit)
def _act(v, z, i, add, relu):
    """v [+ z[i]], then relu when relu: 0 where v < 0, else v (NaN stays NaN)."""
    if add:
        v += _load(z, i)
    if relu and v < 0:
        v = _zero(v)
    return v


@njit(**_jit)
def _mask(dy, y, i, relu):
    """dy[i] where y[i] > 0, else 0, when relu (relu's gradient from its
    output); dy[i] otherwise."""
    g = _load(dy, i)
    if relu and not _load(y, i) > 0:
        g = _zero(g)
    return g


@njit(**_jit)
def _grad(dy, y, dz, i, relu, wdz):
    """_mask(dy, y, i, relu), also stored to dz[i] when wdz (dz: a writable
    array even when not written: dead code is still typed)."""
    g = _mask(dy, y, i, relu)
    if wdz:
        _store(dz, i, g)
    return g


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

@njit(**_jit)
def _team(work, n_threads):
    """Threads worth using for `work` elements."""
    t = work // MIN_PER_THREAD
    if n_threads < 1:
        return 1
    if t < 1:
        t = 1
    if t > n_threads:
        t = n_threads
    return t


@njit(**_jit)
def _tile_len(left):
    """Next tile length: TILE, but split the last two tiles evenly."""
    if left <= TILE:
        return left
    if left < 2 * TILE:
        return left // 2
    return TILE


@njit(**_jit)
def _cut(n, t, T):
    """Start of thread t's share of n items (64-bit safe for n < 2**62 / T)."""
    return (n // T) * t + (n % T) * t // T


@njit(**_jit)
def _chan_merge(cnt, mean, m2, n_b, mean_b, m2_b):
    """Chan's merge of (count, mean, M2) states, in double: the new state."""
    n_a = cnt
    if n_b == 0:
        return cnt, mean, m2
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    d = mean_b - mean
    return n, mean + d * (n_b / n), m2 + m2_b + d * d * (n_a * n_b / n)


@njit(**_jit)
def _merge_tile(st, c, C, n_t, k, s1, s2):
    """Merge one tile's shifted sums (n_t values, shift k, s1 = sum(x-k),
    s2 = sum((x-k)^2)) into channel c's state st = (cnt, anchor, off, m2) x C.
    The mean is kept as an offset from an anchor (the channel's first shift),
    so with |mean| >> std the offsets stay small: (k - anchor) is exact
    (Sterbenz), and the Chan update never subtracts two large means."""
    m2_t = s2 - s1 * s1 / n_t
    if m2_t < 0:
        m2_t = 0.0   # rounding only: (x-k) about the running mean, no cancellation
    if st[c] == 0:
        st[C + c] = k
    cnt, off, m2 = _chan_merge(st[c], st[2 * C + c], st[3 * C + c], n_t,
                               (k - st[C + c]) + s1 / n_t, m2_t)
    st[c] = cnt
    st[2 * C + c] = off
    st[3 * C + c] = m2


# --- inner loops on one contiguous run (the twins of _bn_simd_t.h) ------------

@njit(fastmath=_FM_REDUCE, **_jit)
def _sum(x):
    """Sum of x (element-type partial sums in vector lanes), as a double."""
    s = _ctype(x, 0.0)
    for i in range(x.shape[0]):
        s += _load(x, i)
    return np.float64(s)


@njit(fastmath=_FM_REDUCE, **_jit)
def _shifted_sums_part(x, k):
    p = _ctype(x, 0.0)
    q = _ctype(x, 0.0)
    for i in range(x.shape[0]):
        d = _load(x, i) - k
        p += d
        q += d * d
    return p, q


@njit(**_jit)
def _shifted_sums(x, k, pf):
    """s1 = sum(x - k), s2 = sum((x - k)^2) of one tile, as doubles. The shift
    k is the channel's running mean, so d is small and the element-type partial
    sums over a tile of <= 2048 values lose nothing that matters; tiles are
    merged in double (Chan) by the caller. When pf is as long as x (the same
    channel's next plane), it is prefetched alongside, a line per 64 bytes, in
    steps of PF_STEP values: a channel-order walk jumps between short planes,
    where the hardware prefetchers keep retraining."""
    n = x.shape[0]
    if pf.shape[0] < n:
        p, q = _shifted_sums_part(x, k)
        return np.float64(p), np.float64(q)
    p = _ctype(x, 0.0)
    q = _ctype(x, 0.0)
    line = 64 // x.itemsize
    i = 0
    while i < n:
        e = min(n, i + PF_STEP)
        for j in range(i, e, line):
            _prefetch(pf, j)
        a, b = _shifted_sums_part(x[i:e], k)
        p += a
        q += b
        i = e
    return np.float64(p), np.float64(q)


@njit(fastmath=_FM_REDUCE, **_jit)
def _dot_xmu_part(dy, x, m, y, relu):
    p = _ctype(x, 0.0)
    q = _ctype(x, 0.0)
    for i in range(x.shape[0]):
        g = _mask(dy, y, i, relu)
        p += g
        q += g * (_load(x, i) - m)
    return p, q


@njit(**_jit)
def _dot_xmu(dy, x, m, pfd, pfx, y, relu):
    """Backward sums of one tile: sum(g) and sum(g * (x - m)), as doubles, g = dy
    (masked by relu's gradient from y when relu, see _grad); pfd, pfx prefetched
    alongside when as long as x (see _shifted_sums)."""
    n = x.shape[0]
    if pfx.shape[0] < n:
        p, q = _dot_xmu_part(dy, x, m, y, relu)
        return np.float64(p), np.float64(q)
    p = _ctype(x, 0.0)
    q = _ctype(x, 0.0)
    line = 64 // x.itemsize
    i = 0
    while i < n:
        e = min(n, i + PF_STEP)
        for j in range(i, e, line):
            _prefetch(pfd, j)
            _prefetch(pfx, j)
        a, b = _dot_xmu_part(dy[i:e], x[i:e], m, y[i:e], relu)
        p += a
        q += b
        i = e
    return np.float64(p), np.float64(q)


@njit(fastmath=_FM_ELEMT, **_jit)
def _affine(x, y, z, m, s, b, add, relu):
    """y = act((x - m)*s + b [+ z]), the epilogue of the literal flags (see _act)."""
    for i in range(x.shape[0]):
        _store(y, i, _act((_load(x, i) - m) * s + b, z, i, add, relu))


@njit(fastmath=_FM_ELEMT, **_jit)
def _elemt(dy, x, dx, m, kdy, kx, kc, y, dz, relu, wdz):
    """dx = kdy*g + (kx*(x - m) + kc), g = dy masked by relu's gradient from y
    and stored to dz as the literal flags say (see _grad)."""
    for i in range(x.shape[0]):
        _store(dx, i, kdy * _grad(dy, y, dz, i, relu, wdz) + (kx * (_load(x, i) - m) + kc))


# --- one contiguous run of one channel -------------------------------------

@njit(**_jit)
def _stats_run(x, st, c, C, pf):
    """Merge the statistics of x (one channel's run) into channel c of
    st = (cnt, anchor, off, m2) x C.

    Shifted sums per tile, the shift being the channel's running mean (for the
    first tile its own mean, a second pass over the tile while it is in L1), so
    the tile sums never cancel; tiles are merged in double (Chan). pf: the run
    to prefetch alongside (as long as x), or an empty array."""
    n = x.shape[0]
    prefetch = pf.shape[0] >= n
    i = 0
    while i < n:
        nt = _tile_len(n - i)
        xt = x[i:i + nt]
        if st[c] == 0:
            k = _ctype(x, _sum(xt) / nt)
        else:
            k = _ctype(x, st[C + c] + st[2 * C + c])
        s1, s2 = _shifted_sums(xt, k, pf[i:i + nt] if prefetch else pf[:0])
        _merge_tile(st, c, C, np.float64(nt), np.float64(k), s1, s2)
        i += nt


@njit(**_jit)
def _dot_run(dy, x, m, sd, c, pfd, pfx, y, relu):
    """sd[0, c] += sum(g), sd[1, c] += sum(g*(x - m)), g as in _dot_xmu;
    element-type partial sums per tile, accumulated in double; pfd, pfx
    prefetched alongside when as long as x."""
    n = x.shape[0]
    prefetch = pfx.shape[0] >= n
    i = 0
    while i < n:
        nt = _tile_len(n - i)
        if prefetch:
            a, b = _dot_xmu(dy[i:i + nt], x[i:i + nt], m, pfd[i:i + nt], pfx[i:i + nt],
                            y[i:i + nt], relu)
        else:
            a, b = _dot_xmu(dy[i:i + nt], x[i:i + nt], m, pfd[:0], pfx[:0], y[i:i + nt], relu)
        sd[0, c] += a
        sd[1, c] += b
        i += nt


@njit(**_jit)
def _stream_out(y, stage, n):
    """y[:n] = stage[:n]: ordinary stores up to y's first 64-byte boundary and
    after its last, streaming (non-temporal) stores of whole lines between."""
    per = 64 // y.itemsize
    head = n
    addr = _address(y)
    if addr % y.itemsize == 0:
        head = min(n, np.int64((64 - addr % 64) % 64) // y.itemsize)
    for i in range(head):
        y[i] = stage[i]
    i = head
    while i + per <= n:
        _stream_line(y, i, stage, i)
        i += per
    for j in range(i, n):
        y[j] = stage[j]


def _head(y, n):
    """Values before y's first 64-byte boundary (all n if y is misaligned)."""


@overload(_head, jit_options=_jit)
def _ov_head(y, n):
    def impl(y, n):
        addr = _address(y)
        if addr % y.itemsize != 0:
            return n
        return min(n, np.int64((64 - addr % 64) % 64) // y.itemsize)
    return impl


def _affine_stream(x, y, z, m, s, b, stage, add, relu):
    """y = act((x - m)*s + b [+ z]) (see _affine) with streaming stores: float
    data line by line (a 64-byte vector computed and streamed), float16/bfloat16
    through the stage."""


@overload(_affine_stream, jit_options=_jit, prefer_literal=True)
def _ov_affine_stream(x, y, z, m, s, b, stage, add, relu):
    if _is_16bit(y):
        def impl(x, y, z, m, s, b, stage, add, relu):
            n = x.shape[0]
            i = 0
            while i < n:
                nt = min(stage.shape[0], n - i)
                _affine(x[i:i + nt], stage[:nt], z[i:i + nt], m, s, b, add, relu)
                _stream_out(y[i:i + nt], stage, nt)
                i += nt
        return impl

    def impl(x, y, z, m, s, b, stage, add, relu):
        n = x.shape[0]
        per = 64 // y.itemsize
        i = _head(y, n)
        _affine(x[:i], y[:i], z[:i], m, s, b, add, relu)
        while i + per <= n:
            _nt_affine(x, y, z, i, m, s, b, add, relu)
            i += per
        _affine(x[i:], y[i:], z[i:], m, s, b, add, relu)
    return impl


def _elemt_stream(dy, x, dx, m, a, b, c, stage, y, dz, relu, wdz):
    """_elemt with streaming stores of dx (see _affine_stream); dz, when
    written, takes ordinary stores."""


@overload(_elemt_stream, jit_options=_jit, prefer_literal=True)
def _ov_elemt_stream(dy, x, dx, m, a, b, c, stage, y, dz, relu, wdz):
    if _is_16bit(dx):
        def impl(dy, x, dx, m, a, b, c, stage, y, dz, relu, wdz):
            n = x.shape[0]
            i = 0
            while i < n:
                nt = min(stage.shape[0], n - i)
                _elemt(dy[i:i + nt], x[i:i + nt], stage[:nt], m, a, b, c, y[i:i + nt],
                       dz[i:i + nt], relu, wdz)
                _stream_out(dx[i:i + nt], stage, nt)
                i += nt
        return impl

    def impl(dy, x, dx, m, a, b, c, stage, y, dz, relu, wdz):
        n = x.shape[0]
        per = 64 // dx.itemsize
        i = _head(dx, n)
        _elemt(dy[:i], x[:i], dx[:i], m, a, b, c, y[:i], dz[:i], relu, wdz)
        while i + per <= n:
            _nt_elemt(dy, x, dx, i, m, a, b, c, y, dz, relu, wdz)
            i += per
        _elemt(dy[i:], x[i:], dx[i:], m, a, b, c, y[i:], dz[i:], relu, wdz)
    return impl


def _rows_affine_stream(x, y, z, m, s, b, stage, add, relu):
    """_rows_affine with streaming stores (see _affine_stream)."""


@overload(_rows_affine_stream, jit_options=_jit, prefer_literal=True)
def _ov_rows_affine_stream(x, y, z, m, s, b, stage, add, relu):
    if _is_16bit(y):
        def impl(x, y, z, m, s, b, stage, add, relu):
            n = x.shape[0]
            i = 0
            while i < n:
                nt = min(stage.shape[0], n - i)
                _rows_affine(x[i:i + nt], stage[:nt], z[i:i + nt], m[i:i + nt], s[i:i + nt],
                             b[i:i + nt], add, relu)
                _stream_out(y[i:i + nt], stage, nt)
                i += nt
        return impl

    def impl(x, y, z, m, s, b, stage, add, relu):
        n = x.shape[0]
        per = 64 // y.itemsize
        i = _head(y, n)
        _rows_affine(x[:i], y[:i], z[:i], m[:i], s[:i], b[:i], add, relu)
        while i + per <= n:
            _nt_rows_affine(x, y, z, i, m, s, b, i, add, relu)
            i += per
        _rows_affine(x[i:], y[i:], z[i:], m[i:n], s[i:n], b[i:n], add, relu)
    return impl


def _rows_elemt_stream(dy, x, dx, m, a, b, c, stage, y, dz, relu, wdz):
    """_rows_elemt with streaming stores (see _elemt_stream)."""


@overload(_rows_elemt_stream, jit_options=_jit, prefer_literal=True)
def _ov_rows_elemt_stream(dy, x, dx, m, a, b, c, stage, y, dz, relu, wdz):
    if _is_16bit(dx):
        def impl(dy, x, dx, m, a, b, c, stage, y, dz, relu, wdz):
            n = x.shape[0]
            i = 0
            while i < n:
                nt = min(stage.shape[0], n - i)
                _rows_elemt(dy[i:i + nt], x[i:i + nt], stage[:nt], m[i:i + nt], a[i:i + nt],
                            b[i:i + nt], c[i:i + nt], y[i:i + nt], dz[i:i + nt], relu, wdz)
                _stream_out(dx[i:i + nt], stage, nt)
                i += nt
        return impl

    def impl(dy, x, dx, m, a, b, c, stage, y, dz, relu, wdz):
        n = x.shape[0]
        per = 64 // dx.itemsize
        i = _head(dx, n)
        _rows_elemt(dy[:i], x[:i], dx[:i], m[:i], a[:i], b[:i], c[:i], y[:i], dz[:i], relu,
                    wdz)
        while i + per <= n:
            _nt_rows_elemt(dy, x, dx, i, m, a, b, c, i, y, dz, relu, wdz)
            i += per
        _rows_elemt(dy[i:], x[i:], dx[i:], m[i:n], a[i:n], b[i:n], c[i:n], y[i:], dz[i:],
                    relu, wdz)
    return impl


@njit(**_jit)
def _affine_run(x, y, z, m, s, b, stage, add, relu):
    """y = act((x - m)*s + b [+ z]) (see _affine), constants in the compute
    type. stage: a per-thread buffer (in L1) through which the output is
    streamed, or empty for ordinary stores."""
    m_ = _ctype(x, m)
    s_ = _ctype(x, s)
    b_ = _ctype(x, b)
    if stage.shape[0] == 0:
        _affine(x, y, z, m_, s_, b_, add, relu)
    else:
        _affine_stream(x, y, z, m_, s_, b_, stage, add, relu)


@njit(**_jit)
def _elemt_run(dy, x, dx, m, kdy, kx, kc, stage, y, dz, relu, wdz):
    """dx = kdy*g + kx*(x - m) + kc (see _elemt), constants in the compute
    type; stage as in _affine_run."""
    m_ = _ctype(x, m)
    a = _ctype(x, kdy)
    b = _ctype(x, kx)
    c = _ctype(x, kc)
    if stage.shape[0] == 0:
        _elemt(dy, x, dx, m_, a, b, c, y, dz, relu, wdz)
    else:
        _elemt_stream(dy, x, dx, m_, a, b, c, stage, y, dz, relu, wdz)


# --- per-thread slices of the planes family ---------------------------------

@njit(**_jit)
def _planes_stats_range(x, lo, hi, C, I, st):
    """Statistics of the flat slice [lo, hi) into per-channel states
    st = (cnt, anchor, off, m2) x C."""
    pos = lo
    while pos < hi:
        p = pos // I
        a = pos - p * I
        b = I if hi - pos >= I - a else a + (hi - pos)
        c = p % C
        _stats_run(x[pos:pos + (b - a)], st, c, C, x[:0])
        pos += b - a


@njit(**_jit)
def _planes_dot_range(dy, x, lo, hi, C, I, mean, sd, y, relu):
    pos = lo
    while pos < hi:
        p = pos // I
        a = pos - p * I
        b = I if hi - pos >= I - a else a + (hi - pos)
        c = p % C
        n = b - a
        _dot_run(dy[pos:pos + n], x[pos:pos + n], _ctype(x, mean[c]), sd, c, dy[:0], x[:0],
                 y[pos:pos + n], relu)
        pos += n


@njit(**_jit)
def _planes_affine_range(x, y, z, lo, hi, C, I, mean, scale, shift, stage, add, relu):
    """Normalize the flat slice [lo, hi) in memory order (not channel order),
    with the epilogue of the flags (see _affine)."""
    pos = lo
    while pos < hi:
        p = pos // I
        a = pos - p * I
        b = I if hi - pos >= I - a else a + (hi - pos)
        c = p % C
        n = b - a
        _affine_run(x[pos:pos + n], y[pos:pos + n], z[pos:pos + n], mean[c], scale[c],
                    shift[c], stage, add, relu)
        pos += n


@njit(**_jit)
def _planes_elemt_range(dy, x, dx, lo, hi, C, I, mean, kdy, kx, kc, stage, y, dz, relu, wdz):
    pos = lo
    while pos < hi:
        p = pos // I
        a = pos - p * I
        b = I if hi - pos >= I - a else a + (hi - pos)
        c = p % C
        n = b - a
        _elemt_run(dy[pos:pos + n], x[pos:pos + n], dx[pos:pos + n], mean[c], kdy[c], kx[c],
                   kc[c], stage, y[pos:pos + n], dz[pos:pos + n], relu, wdz)
        pos += n


# --- per-thread slices of the rows family ------------------------------------

@njit(fastmath=_FM_ELEMT, **_jit)
def _rows_stats_wide(x, ld, R, w, n_old, k, anchor, off, m2, a1, a2):
    """Rows statistics, wide form: R rows x w channels (w <= WIDE, row stride
    ld) walked row by row in memory order, four rows at a time, with the tile's
    per-channel partial sums in a1, a2 (L1-resident); then merged into the
    per-channel state (n_old rows so far; mean as `off` from `anchor`; m2). k
    holds the shifts (first row's values, then the running mean; the first
    shift becomes the anchor) and is updated."""
    n_t = np.float64(R)
    n_new = n_old + n_t
    f = n_t / n_new
    g = n_old * n_t / n_new
    inv_n = 1.0 / n_t
    for j in range(w):
        a1[j] = 0
        a2[j] = 0
    r = 0
    while r + 4 <= R:
        x0 = x[r * ld:r * ld + w]
        x1 = x[(r + 1) * ld:(r + 1) * ld + w]
        x2 = x[(r + 2) * ld:(r + 2) * ld + w]
        x3 = x[(r + 3) * ld:(r + 3) * ld + w]
        for j in range(w):
            kj = k[j]
            d0 = _load(x0, j) - kj
            d1 = _load(x1, j) - kj
            d2 = _load(x2, j) - kj
            d3 = _load(x3, j) - kj
            a1[j] += (d0 + d1) + (d2 + d3)
            a2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    while r < R:
        x0 = x[r * ld:r * ld + w]
        for j in range(w):
            d0 = _load(x0, j) - k[j]
            a1[j] += d0
            a2[j] += d0 * d0
        r += 1
    if n_old == 0:
        for j in range(w):
            anchor[j] = k[j]
            off[j] = 0
            m2[j] = 0
    for j in range(w):
        t1 = np.float64(a1[j])
        mt = t1 * inv_n
        m2t = np.float64(a2[j]) - t1 * mt
        # clamp rounding only (no cancellation about the running mean); NaN, from
        # a NaN or inf in the channel, passes through (`m2t > 0` is False for NaN)
        m2t = 0.0 if m2t < 0 else m2t
        d = (np.float64(k[j]) - anchor[j]) + mt - off[j]
        off[j] += d * f
        m2[j] += m2t + d * d * g
        k[j] = anchor[j] + off[j]


@njit(**_jit)
def _rows_stats_block(x, ld, nrows, c0, c1, n_old, st, S, k, a1, a2, R):
    """Statistics of nrows rows (stride ld) x columns [c0, c1) of x into the
    states st = (cnt, anchor, off, m2) x S, R rows per tile, rows walked in
    memory order with the tile's partial sums in L1 (wide blocks of up to WIDE
    columns), tiles merged per column (Chan). n_old: rows already merged into
    these states (0: start them, the first row's values being the shifts)."""
    if nrows <= 0 or c1 <= c0:
        return
    if n_old == 0:
        # first shift: the first row's values (a tile's shifted sums then
        # cover at most R values per column, merged in double)
        for c in range(c0, c1):
            k[c] = _load(x, c)
    r = 0
    while r < nrows:
        rt = R if nrows - r > R else nrows - r
        cb = c0
        while cb < c1:
            w = WIDE if c1 - cb > WIDE else c1 - cb
            _rows_stats_wide(x[r * ld + cb:], ld, rt, w, n_old, k[cb:cb + w],
                             st[S + cb:S + cb + w], st[2 * S + cb:2 * S + cb + w],
                             st[3 * S + cb:3 * S + cb + w], a1, a2)
            cb += w
        n_old += rt
        r += rt
    for c in range(c0, c1):
        st[c] = n_old


@njit(**_jit)
def _rows_stats_range(x, r0, r1, c0, c1, C, G, st, k, a1, a2, R):
    """Statistics of rows [r0, r1) x channels [c0, c1) into st (stride
    S = len(st) // 4).

    G > 1 (all channels, few of them): G consecutive rows are walked as one
    virtual row of G*C <= WIDE values, so each pass of the wide loop covers
    WIDE values instead of C (with 64 channels, a 256-byte row would leave the
    loop all overhead); the G replica states of a channel (slots c, C + c,
    ...) are Chan-merged into slot c at the end, leftover rows go to slot c."""
    S = st.shape[0] // 4
    if r1 <= r0 or c1 <= c0:
        return
    nv = (r1 - r0) // G
    if G == 1 or nv == 0:
        _rows_stats_block(x[r0 * C:], C, r1 - r0, c0, c1, 0.0, st, S, k, a1, a2, R)
        return
    V = G * C
    _rows_stats_block(x[r0 * C:], V, nv, 0, V, 0.0, st, S, k, a1, a2, R)
    _rows_stats_block(x[(r0 + nv * G) * C:], C, r1 - r0 - nv * G, 0, C, np.float64(nv), st,
                      S, k, a1, a2, R)
    for c in range(C):
        cnt = st[c]
        a = st[S + c]
        off = st[2 * S + c]
        m2 = st[3 * S + c]
        for g in range(1, G):
            j = g * C + c
            cnt, off, m2 = _chan_merge(cnt, off, m2, st[j], (st[S + j] - a) + st[2 * S + j],
                                       st[3 * S + j])
        st[c] = cnt
        st[2 * S + c] = off
        st[3 * S + c] = m2


@njit(fastmath=_FM_ELEMT, **_jit)
def _rows_dot_wide(dy, x, ld, R, w, m, sdy, sdyxmu, a1, a2, y, relu):
    """Rows backward sums, wide form (see _rows_stats_wide):
    sdy += sum(g), sdyxmu += sum(g*(x - m)) over R rows x w channels, g = dy
    masked by relu's gradient from y when relu (see _mask)."""
    for j in range(w):
        a1[j] = 0
        a2[j] = 0
    r = 0
    while r + 4 <= R:
        g0 = dy[r * ld:r * ld + w]
        g1 = dy[(r + 1) * ld:(r + 1) * ld + w]
        g2 = dy[(r + 2) * ld:(r + 2) * ld + w]
        g3 = dy[(r + 3) * ld:(r + 3) * ld + w]
        x0 = x[r * ld:r * ld + w]
        x1 = x[(r + 1) * ld:(r + 1) * ld + w]
        x2 = x[(r + 2) * ld:(r + 2) * ld + w]
        x3 = x[(r + 3) * ld:(r + 3) * ld + w]
        y0 = y[r * ld:r * ld + w]
        y1 = y[(r + 1) * ld:(r + 1) * ld + w]
        y2 = y[(r + 2) * ld:(r + 2) * ld + w]
        y3 = y[(r + 3) * ld:(r + 3) * ld + w]
        for j in range(w):
            mj = m[j]
            u0 = _mask(g0, y0, j, relu)
            u1 = _mask(g1, y1, j, relu)
            u2 = _mask(g2, y2, j, relu)
            u3 = _mask(g3, y3, j, relu)
            a1[j] += (u0 + u1) + (u2 + u3)
            a2[j] += ((u0 * (_load(x0, j) - mj) + u1 * (_load(x1, j) - mj))
                      + (u2 * (_load(x2, j) - mj) + u3 * (_load(x3, j) - mj)))
        r += 4
    while r < R:
        g0 = dy[r * ld:r * ld + w]
        x0 = x[r * ld:r * ld + w]
        y0 = y[r * ld:r * ld + w]
        for j in range(w):
            u0 = _mask(g0, y0, j, relu)
            a1[j] += u0
            a2[j] += u0 * (_load(x0, j) - m[j])
        r += 1
    for j in range(w):
        sdy[j] += a1[j]
        sdyxmu[j] += a2[j]


@njit(**_jit)
def _rows_dot_block(dy, x, ld, nrows, c0, c1, mean, sd, a1, a2, R, y, relu):
    r = 0
    while r < nrows:
        rt = R if nrows - r > R else nrows - r
        cb = c0
        while cb < c1:
            w = WIDE if c1 - cb > WIDE else c1 - cb
            at = r * ld + cb
            _rows_dot_wide(dy[at:], x[at:], ld, rt, w, mean[cb:cb + w], sd[0, cb:cb + w],
                           sd[1, cb:cb + w], a1, a2, y[at:], relu)
            cb += w
        r += rt


@njit(**_jit)
def _rows_dot_range(dy, x, r0, r1, c0, c1, C, G, mean, sd, a1, a2, R, y, relu):
    """Backward sums of rows [r0, r1) x channels [c0, c1) into sd (2, S); G
    rows per virtual row as in _rows_stats_range (mean tiled G times), the
    replicas summed into slot c at the end. y, relu: see _rows_dot_wide."""
    if r1 <= r0 or c1 <= c0:
        return
    nv = (r1 - r0) // G
    if G == 1 or nv == 0:
        _rows_dot_block(dy[r0 * C:], x[r0 * C:], C, r1 - r0, c0, c1, mean, sd, a1, a2, R,
                        y[r0 * C:], relu)
        return
    V = G * C
    _rows_dot_block(dy[r0 * C:], x[r0 * C:], V, nv, 0, V, mean, sd, a1, a2, R, y[r0 * C:],
                    relu)
    r = r0 + nv * G
    _rows_dot_block(dy[r * C:], x[r * C:], C, r1 - r, 0, C, mean, sd, a1, a2, R, y[r * C:],
                    relu)
    for c in range(C):
        for g in range(1, G):
            sd[0, c] += sd[0, g * C + c]
            sd[1, c] += sd[1, g * C + c]


@njit(fastmath=_FM_ELEMT, **_jit)
def _rows_affine(x, y, z, m, s, b, add, relu):
    """One row (or part of one): y = act((x - m)*s + b [+ z]) with per-column
    constants (see _affine)."""
    for j in range(x.shape[0]):
        _store(y, j, _act((_load(x, j) - m[j]) * s[j] + b[j], z, j, add, relu))


@njit(fastmath=_FM_ELEMT, **_jit)
def _rows_elemt(dy, x, dx, m, kdy, kx, kc, y, dz, relu, wdz):
    """dx = kdy*g + (kx*(x - m) + kc) with per-column constants (see _elemt)."""
    for j in range(x.shape[0]):
        _store(dx, j, kdy[j] * _grad(dy, y, dz, j, relu, wdz) + (kx[j] * (_load(x, j) - m[j])
                                                                 + kc[j]))


@njit(**_jit)
def _rows_affine_chunk(x, y, z, m, s, b, stage, add, relu):
    if stage.shape[0] == 0:
        _rows_affine(x, y, z, m, s, b, add, relu)
    else:
        _rows_affine_stream(x, y, z, m, s, b, stage, add, relu)


@njit(**_jit)
def _rows_elemt_chunk(dy, x, dx, m, kdy, kx, kc, stage, y, dz, relu, wdz):
    if stage.shape[0] == 0:
        _rows_elemt(dy, x, dx, m, kdy, kx, kc, y, dz, relu, wdz)
    else:
        _rows_elemt_stream(dy, x, dx, m, kdy, kx, kc, stage, y, dz, relu, wdz)


@njit(**_jit)
def _rows_affine_range(x, y, z, lo, hi, C, P, m, s, b, stage, add, relu):
    """Normalize the flat slice [lo, hi) of an (O, C) array, with the epilogue
    of the flags (see _affine). The per-column constants are tiled to a period
    P (a multiple of C, >= ROW_SPAN values), so after finishing a partial first
    row the slice is walked in runs of up to P values that start on a row
    boundary: long vectorised loops even with few channels (the Cython kernel
    tiles the same way). stage as in _affine_run."""
    pos = lo
    j0 = pos % C
    if j0 != 0:
        n = min(C - j0, hi - pos)
        _rows_affine_chunk(x[pos:pos + n], y[pos:pos + n], z[pos:pos + n], m[j0:j0 + n],
                           s[j0:j0 + n], b[j0:j0 + n], stage, add, relu)
        pos += n
    while pos < hi:
        n = min(P, hi - pos)
        _rows_affine_chunk(x[pos:pos + n], y[pos:pos + n], z[pos:pos + n], m[:n], s[:n], b[:n],
                           stage, add, relu)
        pos += n


@njit(**_jit)
def _rows_elemt_range(dy, x, dx, lo, hi, C, P, m, kdy, kx, kc, stage, y, dz, relu, wdz):
    pos = lo
    j0 = pos % C
    if j0 != 0:
        n = min(C - j0, hi - pos)
        _rows_elemt_chunk(dy[pos:pos + n], x[pos:pos + n], dx[pos:pos + n], m[j0:j0 + n],
                          kdy[j0:j0 + n], kx[j0:j0 + n], kc[j0:j0 + n], stage, y[pos:pos + n],
                          dz[pos:pos + n], relu, wdz)
        pos += n
    while pos < hi:
        n = min(P, hi - pos)
        _rows_elemt_chunk(dy[pos:pos + n], x[pos:pos + n], dx[pos:pos + n], m[:n], kdy[:n],
                          kx[:n], kc[:n], stage, y[pos:pos + n], dz[pos:pos + n], relu, wdz)
        pos += n


# --- merging per-thread partials ----------------------------------------------

@njit(**_jit)
def _merge_stats(st, T, C, mean_out, m2_out):
    """Chan-merge the per-thread (cnt, anchor, off, m2) states (stride
    S = st.shape[1] // 4), in thread order, about the first thread's anchor
    (anchors are close: the difference is exact)."""
    S = st.shape[1] // 4
    for c in range(C):
        cnt = 0.0
        a = 0.0
        off = 0.0
        m2 = 0.0
        for t in range(T):
            if st[t, c] == 0:
                continue
            if cnt == 0:
                a = st[t, S + c]
            cnt, off, m2 = _chan_merge(cnt, off, m2, st[t, c],
                                       (st[t, S + c] - a) + st[t, 2 * S + c], st[t, 3 * S + c])
        mean_out[c] = a + off
        m2_out[c] = m2


@njit(**_jit)
def _merge_sums(sd, T, C, a_out, b_out):
    for c in range(C):
        a = 0.0
        b = 0.0
        for t in range(T):
            a += sd[t, 0, c]
            b += sd[t, 1, c]
        a_out[c] = a
        b_out[c] = b


@njit(**_jit)
def _split_rows(O, T):
    """Rows family: split the rows across threads (else the channels)."""
    return O >= 16 * T


# ----------------------------------------------------------------------------
# thread-team kernels (the prange bodies of the Cython kernels)
# ----------------------------------------------------------------------------

@njit(parallel=True, **_jit)
def _stats_planes(x, C, I, T, st):
    N = x.shape[0]
    for t in prange(T):
        _planes_stats_range(x, _cut(N, t, T), _cut(N, t + 1, T), C, I, st[t])


@njit(parallel=True, **_jit)
def _stats_rows(x, C, G, T, st, k, a1, a2, R):
    O = x.shape[0] // C
    by_rows = _split_rows(O, T)
    blk = 16   # channel-split granularity: 64-byte boundaries for float32
    for t in prange(T):
        if by_rows:
            _rows_stats_range(x, _cut(O, t, T), _cut(O, t + 1, T), 0, C, C, G, st[t], k[t],
                              a1[t], a2[t], R)
        else:
            c0 = _cut(C // blk, t, T) * blk
            c1 = C if t == T - 1 else _cut(C // blk, t + 1, T) * blk
            _rows_stats_range(x, 0, O, c0, c1, C, 1, st[t], k[t], a1[t], a2[t], R)


# Each thread-team kernel is made by a factory from the epilogue flags, which the
# kernel's body holds as constants: its callees see them as literal bools (see
# _act). _by_flags keeps one dispatcher per combination of flags, compiled (or
# loaded from the disk cache) on its first call; the plain kernel is the one with
# every flag False, under the kernel's own name.

def _by_flags(make, n_flags):
    """{flags: make(*flags)} over every combination of n_flags bools."""
    return {flags: make(*flags) for flags in itertools.product((False, True), repeat=n_flags)}


def _make_normalize_planes(add, relu):
    @njit(parallel=True, **_jit)
    def _normalize_planes(x, y, z, C, I, T, mean, scale, shift, stage):
        N = x.shape[0]
        for t in prange(T):
            _planes_affine_range(x, y, z, _cut(N, t, T), _cut(N, t + 1, T), C, I, mean, scale,
                                 shift, stage[t], add, relu)
            if stage.shape[1] > 0:
                _store_fence()
    return _normalize_planes


def _make_normalize_rows(add, relu):
    @njit(parallel=True, **_jit)
    def _normalize_rows(x, y, z, C, P, T, mean, scale, shift, stage):
        N = x.shape[0]
        for t in prange(T):
            _rows_affine_range(x, y, z, _cut(N, t, T), _cut(N, t + 1, T), C, P, mean, scale,
                               shift, stage[t], add, relu)
            if stage.shape[1] > 0:
                _store_fence()
    return _normalize_rows


def _make_backward_reduce_planes(relu):
    @njit(parallel=True, **_jit)
    def _backward_reduce_planes(dy, x, C, I, T, mean, sd, y):
        N = x.shape[0]
        for t in prange(T):
            _planes_dot_range(dy, x, _cut(N, t, T), _cut(N, t + 1, T), C, I, mean, sd[t], y,
                              relu)
    return _backward_reduce_planes


def _make_backward_reduce_rows(relu):
    @njit(parallel=True, **_jit)
    def _backward_reduce_rows(dy, x, C, G, T, mean, sd, a1, a2, R, y):
        O = x.shape[0] // C
        by_rows = _split_rows(O, T)
        blk = 16
        for t in prange(T):
            if by_rows:
                _rows_dot_range(dy, x, _cut(O, t, T), _cut(O, t + 1, T), 0, C, C, G, mean,
                                sd[t], a1[t], a2[t], R, y, relu)
            else:
                c0 = _cut(C // blk, t, T) * blk
                c1 = C if t == T - 1 else _cut(C // blk, t + 1, T) * blk
                _rows_dot_range(dy, x, 0, O, c0, c1, C, 1, mean, sd[t], a1[t], a2[t], R, y,
                                relu)
    return _backward_reduce_rows


def _make_backward_elemt_planes(relu, wdz):
    @njit(parallel=True, **_jit)
    def _backward_elemt_planes(dy, x, dx, C, I, T, mean, kdy, kx, kc, stage, y, dz):
        N = x.shape[0]
        for t in prange(T):
            _planes_elemt_range(dy, x, dx, _cut(N, t, T), _cut(N, t + 1, T), C, I, mean, kdy,
                                kx, kc, stage[t], y, dz, relu, wdz)
            if stage.shape[1] > 0:
                _store_fence()
    return _backward_elemt_planes


def _make_backward_elemt_rows(relu, wdz):
    @njit(parallel=True, **_jit)
    def _backward_elemt_rows(dy, x, dx, C, P, T, mean, kdy, kx, kc, stage, y, dz):
        N = x.shape[0]
        for t in prange(T):
            _rows_elemt_range(dy, x, dx, _cut(N, t, T), _cut(N, t + 1, T), C, P, mean, kdy, kx,
                              kc, stage[t], y, dz, relu, wdz)
            if stage.shape[1] > 0:
                _store_fence()
    return _backward_elemt_rows


_NORMALIZE_PLANES = _by_flags(_make_normalize_planes, 2)         # by (add, relu)
_NORMALIZE_ROWS = _by_flags(_make_normalize_rows, 2)
_BACKWARD_REDUCE_PLANES = _by_flags(_make_backward_reduce_planes, 1)   # by (relu,)
_BACKWARD_REDUCE_ROWS = _by_flags(_make_backward_reduce_rows, 1)
_BACKWARD_ELEMT_PLANES = _by_flags(_make_backward_elemt_planes, 2)     # by (relu, wdz)
_BACKWARD_ELEMT_ROWS = _by_flags(_make_backward_elemt_rows, 2)
_normalize_planes = _NORMALIZE_PLANES[False, False]
_normalize_rows = _NORMALIZE_ROWS[False, False]
_backward_reduce_planes = _BACKWARD_REDUCE_PLANES[False,]
_backward_reduce_rows = _BACKWARD_REDUCE_ROWS[False,]
_backward_elemt_planes = _BACKWARD_ELEMT_PLANES[False, False]
_backward_elemt_rows = _BACKWARD_ELEMT_ROWS[False, False]


# --- fused per-channel paths ----------------------------------------------------

@njit(**_jit)
def _fused_forward_channel(x, y, z, O, C, I, c, weight, bias, eps, mean_out, m2_out, st, stage,
                           add, relu):
    """Statistics of channel c, then its normalization while it is still in L2,
    with the epilogue of the flags (see _affine)."""
    st[0] = 0.0
    st[1] = 0.0
    st[2] = 0.0
    st[3] = 0.0
    for o in range(O):
        p = (o * C + c) * I
        # prefetch the channel's next plane: short planes far apart defeat the
        # hardware prefetchers
        q = p + C * I if o + 1 < O else p
        _stats_run(x[p:p + I], st, 0, 1, x[q:q + I] if o + 1 < O else x[:0])
    mean = st[1] + st[2]
    invstd = 1.0 / np.sqrt(st[3] / st[0] + eps)
    scale = weight[c] * invstd
    mean_s = _ctype(mean_out, mean)   # the stat-dtype mean (a <stat_t> cast)
    # (x - m)*s + b with m the stat-dtype mean: fold its rounding error into
    # the shift so large-mean channels lose nothing to it.
    shift = bias[c] - (mean - np.float64(mean_s)) * scale
    for o in range(O):
        p = (o * C + c) * I
        _affine_run(x[p:p + I], y[p:p + I], z[p:p + I], mean_s, scale, shift, stage, add, relu)
    mean_out[c] = mean_s
    m2_out[c] = st[3]


@njit(**_jit)
def _fused_backward_channel(dy, x, dx, O, C, I, c, mean, invstd, weight, sdy_out, sdyx_out,
                            sd, stage):
    """Both reductions of channel c, then its dx while (dy, x) are still in L2."""
    sd[0, 0] = 0.0
    sd[1, 0] = 0.0
    n = np.float64(O) * I
    m = _ctype(x, mean[c])
    istd = np.float64(invstd[c])
    for o in range(O):
        p = (o * C + c) * I
        q = p + C * I if o + 1 < O else p
        _dot_run(dy[p:p + I], x[p:p + I], m, sd, 0, dy[q:q + I] if o + 1 < O else dy[:0],
                 x[q:q + I] if o + 1 < O else x[:0], dy[p:p + I], False)
    sdy = sd[0, 0]
    sdyx = sd[1, 0]
    w_is = weight[c] * istd
    kdy = w_is
    kx = -w_is * istd * istd * sdyx / n
    kc = -w_is * sdy / n
    for o in range(O):
        p = (o * C + c) * I
        _elemt_run(dy[p:p + I], x[p:p + I], dx[p:p + I], m, _ctype(sdy_out, kdy),
                   _ctype(sdy_out, kx), _ctype(sdy_out, kc), stage, dy[p:p + I], dx[p:p + I],
                   False, False)
    sdy_out[c] = sdy
    sdyx_out[c] = sdyx


def _make_forward_train_fused(add, relu):
    @njit(parallel=True, **_jit)
    def _forward_train_fused(x, y, z, O, C, I, T, weight, bias, eps, mean_out, m2_out, st,
                             stage):
        for t in prange(T):
            for c in range(_cut(C, t, T), _cut(C, t + 1, T)):
                _fused_forward_channel(x, y, z, O, C, I, c, weight, bias, eps, mean_out, m2_out,
                                       st[t], stage[t], add, relu)
            if stage.shape[1] > 0:
                _store_fence()
    return _forward_train_fused


_FORWARD_TRAIN_FUSED = _by_flags(_make_forward_train_fused, 2)   # by (add, relu)
_forward_train_fused = _FORWARD_TRAIN_FUSED[False, False]


@njit(parallel=True, **_jit)
def _backward_train_fused(dy, x, dx, O, C, I, T, mean, invstd, weight, sdy_out, sdyx_out, sd,
                          stage):
    for t in prange(T):
        for c in range(_cut(C, t, T), _cut(C, t + 1, T)):
            _fused_backward_channel(dy, x, dx, O, C, I, c, mean, invstd, weight, sdy_out,
                                    sdyx_out, sd[t], stage[t])
        if stage.shape[1] > 0:
            _store_fence()


@njit(**_jit)
def _fold_forward(mean64, m2, mean, weight, bias, eps, n, scale, shift):
    """scale = weight/sqrt(m2/n + eps), shift = bias, in double; normalize
    subtracts the stat-dtype mean, so its rounding error moves into the shift
    (large-mean float32 channels keep full accuracy)."""
    for c in range(mean64.shape[0]):
        sc = weight[c] / np.sqrt(m2[c] / n + eps)
        scale[c] = sc
        shift[c] = bias[c] - (mean64[c] - np.float64(mean[c])) * sc


@njit(**_jit)
def _fold_backward(sum_dy, sum_dy_xmu, invstd, weight, n, k_dy, k_x, k_c):
    for c in range(sum_dy.shape[0]):
        istd = np.float64(invstd[c])
        w_is = weight[c] * istd
        k_dy[c] = w_is
        k_x[c] = -w_is * istd * istd * np.float64(sum_dy_xmu[c]) / n
        k_c[c] = -w_is * np.float64(sum_dy[c]) / n


@njit(**_jit)
def _fuse(O, C, I, bytes_per_value, T):
    """Per-channel fusion pays when a channel's bytes fit in L2 and the channels
    share out evenly over the threads (planes only)."""
    if I <= 1 or O * I * bytes_per_value > FUSE_MAX_BYTES:
        return False
    return C >= 4 * T or C % T == 0


# ----------------------------------------------------------------------------
# kernels: Python entry points (allocate the small outputs, launch the team)
# ----------------------------------------------------------------------------

def _stat_dtype(x):
    return np.float64 if x.dtype == np.float64 else np.float32


def _use_threads(T):
    """Run the next parallel region of this thread with T threads (numba's
    setting is thread-local and at most NUMBA_NUM_THREADS)."""
    numba.set_num_threads(max(1, min(T, numba.config.NUMBA_NUM_THREADS)))


def _flat(a):
    return a.reshape(-1)


def _period(C):
    """Period of the tiled per-column constants of the rows element-wise
    kernels: the smallest multiple of C that is at least ROW_SPAN."""
    return C * max(1, -(-ROW_SPAN // C))


def _should_stream(y):
    """Whether the output y should be written with streaming stores (as
    fbn_should_stream): only when it is large, 64-byte aligned (a caller's
    out= buffer; numpy's own large allocations are 16 mod 64) and already
    touched. Streaming into fresh, never-touched pages takes a page fault per
    4 KiB under the streaming store and was measured 8x slower than ordinary
    stores, so on Linux the first, middle and last pages must be resident."""
    if y.nbytes < STREAM_MIN_BYTES or y.ctypes.data % 64 != 0 or _mincore is None:
        return False
    lo = y.ctypes.data
    for p in (lo, lo + y.nbytes // 2, lo + y.nbytes - 1):
        page = p - p % _PAGE
        vec = ctypes.c_ubyte(0)
        if _mincore(ctypes.c_void_p(page), ctypes.c_size_t(1), ctypes.byref(vec)) != 0 \
                or not vec.value & 1:
            return False
    return True


def _stage(y, T):
    """Per-thread staging buffers for streaming stores into y (shape (T, 0):
    ordinary stores)."""
    return np.empty((T, STAGE if _should_stream(y) else 0), dtype=y.dtype)


def _replicas(O, C, T):
    """Rows reductions: rows per virtual row (see _rows_stats_range); 1 when
    the channels are many or the threads split the channels."""
    if C > WIDE // 2 or not _split_rows(O, T):
        return 1
    return WIDE // C


def _expand(v, P):
    """A per-channel vector tiled to P values (P a multiple of its length)."""
    return np.ascontiguousarray(np.tile(v, P // v.shape[0]))


def stats(x, n_threads=1):
    """Per-channel ``mean`` and ``m2 = sum((x - mean)**2)`` over axes 0 and 2.

    One read of ``x``; shifted sums per tile about the running mean, tiles and
    threads merged in double with Chan's formula.

    Returns
    -------
    (mean, m2) : two (C,) arrays of the stat dtype.
    """
    dt = _stat_dtype(x)
    mean, m2 = _stats64(x, n_threads)
    return mean.astype(dt), m2.astype(dt)


def _stats64(x, n_threads):
    """stats() with float64 results (forward_train folds with the exact mean)."""
    O, C, I = x.shape
    N = O * C * I
    mean = np.empty(C, dtype=np.float64)
    m2 = np.empty(C, dtype=np.float64)
    if N == 0:
        mean.fill(np.nan)
        m2.fill(0)
        return mean, m2
    T = _team(N, n_threads)
    _use_threads(T)
    if I > 1:
        st = np.zeros((T, 4 * C), dtype=np.float64)
        _stats_planes(_flat(x), C, I, T, st)
    else:
        G = _replicas(O, C, T)
        kdt = np.float64 if x.dtype == np.float64 else np.float32
        st = np.zeros((T, 4 * G * C), dtype=np.float64)
        k = np.empty((T, G * C), dtype=kdt)
        a1 = np.empty((T, WIDE), dtype=kdt)
        a2 = np.empty((T, WIDE), dtype=kdt)
        _stats_rows(_flat(x), C, G, T, st, k, a1, a2, ROW_TILE)
    _merge_stats(st, T, C, mean, m2)
    return mean, m2


def normalize(x, mean, scale, shift, y, n_threads=1):
    """Write ``y = (x - mean)*scale + shift`` (per-channel vectors broadcast);
    threads take contiguous slices in memory order. ``y`` may be ``x``."""
    normalize_epilogue(x, mean, scale, shift, None, False, y, n_threads)


def normalize_epilogue(x, mean, scale, shift, z, relu, y, n_threads=1):
    """Write ``y = act((x - mean)*scale + shift [+ z])``, computed in the
    compute type and rounded once: ``z`` (like ``x``) added when not None, then
    relu (0 where negative, NaN stays NaN) when ``relu``; in the same single
    pass as :func:`normalize`. ``y`` may be ``x`` or ``z``."""
    O, C, I = x.shape
    N = O * C * I
    if N == 0:
        return
    add = z is not None
    T = _team((2 if add else 1) * N, n_threads)
    _use_threads(T)
    stage = _stage(y, T)
    zf = _flat(z if add else x)
    relu = bool(relu)
    if I > 1:
        _NORMALIZE_PLANES[add, relu](_flat(x), _flat(y), zf, C, I, T, mean, scale, shift, stage)
    else:
        P = _period(C)
        _NORMALIZE_ROWS[add, relu](_flat(x), _flat(y), zf, C, P, T, _expand(mean, P),
                                   _expand(scale, P), _expand(shift, P), stage)


def backward_reduce(dy, x, mean, n_threads=1):
    """Per-channel ``sum(dy)`` and ``sum(dy*(x - mean))`` in one read of (dy, x).

    Element-type partial sums per tile (<= 2048 values, or one row tile),
    accumulated in double per thread and channel.

    Returns
    -------
    (sum_dy, sum_dy_xmu) : two (C,) arrays of the stat dtype.
    """
    return _backward_reduce(dy, None, x, mean, n_threads)


def backward_reduce_relu(dy, y, x, mean, n_threads=1):
    """:func:`backward_reduce` of ``g = dy where y > 0, else 0`` (the gradient
    through a relu whose output was ``y``), in one read of (dy, y, x).

    Returns
    -------
    (sum_g, sum_g_xmu) : two (C,) arrays of the stat dtype.
    """
    return _backward_reduce(dy, y, x, mean, n_threads)


def _backward_reduce(dy, y, x, mean, n_threads):
    O, C, I = x.shape
    N = O * C * I
    dt = _stat_dtype(x)
    sum_dy = np.zeros(C, dtype=dt)
    sum_dy_xmu = np.zeros(C, dtype=dt)
    if N == 0:
        return sum_dy, sum_dy_xmu
    relu = y is not None
    T = _team((3 if relu else 2) * N, n_threads)
    _use_threads(T)
    yf = _flat(y if relu else dy)
    if I > 1:
        sd = np.zeros((T, 2, C), dtype=np.float64)
        _BACKWARD_REDUCE_PLANES[relu,](_flat(dy), _flat(x), C, I, T, mean, sd, yf)
    else:
        G = _replicas(O, C, T)
        sd = np.zeros((T, 2, G * C), dtype=np.float64)
        a1 = np.empty((T, WIDE), dtype=dt)
        a2 = np.empty((T, WIDE), dtype=dt)
        _BACKWARD_REDUCE_ROWS[relu,](_flat(dy), _flat(x), C, G, T, _expand(mean, G * C), sd,
                                     a1, a2, ROW_TILE, yf)
    _merge_sums(sd, T, C, sum_dy, sum_dy_xmu)
    return sum_dy, sum_dy_xmu


def backward_elemt(dy, x, mean, k_dy, k_x, k_c, dx, n_threads=1):
    """Write ``dx = k_dy*dy + k_x*(x - mean) + k_c`` (per-channel vectors broadcast)."""
    _backward_elemt(dy, None, x, mean, k_dy, k_x, k_c, None, dx, n_threads)


def backward_elemt_relu(dy, y, x, mean, k_dy, k_x, k_c, dz, dx, n_threads=1):
    """:func:`backward_elemt` of ``g = dy where y > 0, else 0`` (see
    :func:`backward_reduce_relu`), also writing ``dz = g`` when ``dz`` is not
    None, in the same pass."""
    _backward_elemt(dy, y, x, mean, k_dy, k_x, k_c, dz, dx, n_threads)


def _backward_elemt(dy, y, x, mean, k_dy, k_x, k_c, dz, dx, n_threads):
    O, C, I = x.shape
    N = O * C * I
    if N == 0:
        return
    relu = y is not None
    wdz = dz is not None
    T = _team((2 + relu + wdz) * N, n_threads)
    _use_threads(T)
    stage = _stage(dx, T)
    yf = _flat(y if relu else dy)
    dzf = _flat(dz if wdz else dx)
    if I > 1:
        _BACKWARD_ELEMT_PLANES[relu, wdz](_flat(dy), _flat(x), _flat(dx), C, I, T, mean, k_dy,
                                          k_x, k_c, stage, yf, dzf)
    else:
        P = _period(C)
        _BACKWARD_ELEMT_ROWS[relu, wdz](_flat(dy), _flat(x), _flat(dx), C, P, T,
                                        _expand(mean, P), _expand(k_dy, P), _expand(k_x, P),
                                        _expand(k_c, P), stage, yf, dzf)


def forward_train(x, weight, bias, eps, y, n_threads=1):
    """Training forward: statistics, then ``y = (x - mean)*scale + bias`` with
    ``scale = weight/sqrt(m2/n + eps)``.

    Fused per channel (the second read comes from L2) when a channel is small
    enough; otherwise the stats kernel then the normalize kernel.

    Returns
    -------
    (mean, m2) : as :func:`stats`.
    """
    return forward_train_epilogue(x, weight, bias, eps, None, False, y, n_threads)


def forward_train_epilogue(x, weight, bias, eps, z, relu, y, n_threads=1):
    """:func:`forward_train` with the epilogue of :func:`normalize_epilogue`
    applied as ``y`` is written: the same passes over ``x``, one read of ``z``.

    Returns
    -------
    (mean, m2) : as :func:`stats`.
    """
    O, C, I = x.shape
    N = O * C * I
    dt = _stat_dtype(x)
    T = _team(N, n_threads)
    if N == 0 or not _fuse(O, C, I, x.itemsize, T):
        mean64, m2_64 = _stats64(x, n_threads)
        mean = mean64.astype(dt)
        scale = np.empty(C, dtype=dt)
        shift = np.empty(C, dtype=dt)
        _fold_forward(mean64, m2_64, mean, weight, bias, float(eps), float(O * I), scale, shift)
        normalize_epilogue(x, mean, scale, shift, z, relu, y, n_threads)
        return mean, m2_64.astype(dt)
    mean = np.empty(C, dtype=dt)
    m2 = np.empty(C, dtype=dt)
    _use_threads(T)
    st = np.zeros((T, 4), dtype=np.float64)
    add = z is not None
    _FORWARD_TRAIN_FUSED[add, bool(relu)](_flat(x), _flat(y), _flat(z if add else x), O, C, I, T,
                                          weight, bias, float(eps), mean, m2, st, _stage(y, T))
    return mean, m2


def backward_train(dy, x, mean, invstd, weight, dx, n_threads=1):
    """Training backward: the two reductions, then
    ``dx = k_dy*dy + k_x*(x - mean) + k_c`` with ``k_dy = w*invstd``,
    ``k_x = -w*invstd**3*sum_dy_xmu/n``, ``k_c = -w*invstd*sum_dy/n``.

    Fused per channel when (dy, x) of one channel fit in L2; otherwise the
    reduce kernel then the element-wise kernel.

    Returns
    -------
    (sum_dy, sum_dy_xmu) : as :func:`backward_reduce`.
    """
    O, C, I = x.shape
    N = O * C * I
    dt = _stat_dtype(x)
    T = _team(2 * N, n_threads)
    if N == 0 or not _fuse(O, C, I, 2 * x.itemsize, T):
        sum_dy, sum_dy_xmu = backward_reduce(dy, x, mean, n_threads)
        k_dy = np.empty(C, dtype=dt)
        k_x = np.empty(C, dtype=dt)
        k_c = np.empty(C, dtype=dt)
        _fold_backward(sum_dy, sum_dy_xmu, invstd, weight, float(O * I), k_dy, k_x, k_c)
        backward_elemt(dy, x, mean, k_dy, k_x, k_c, dx, n_threads)
        return sum_dy, sum_dy_xmu
    sum_dy = np.empty(C, dtype=dt)
    sum_dy_xmu = np.empty(C, dtype=dt)
    _use_threads(T)
    sd = np.zeros((T, 2, 1), dtype=np.float64)
    _backward_train_fused(_flat(dy), _flat(x), _flat(dx), O, C, I, T, mean, invstd, weight,
                          sum_dy, sum_dy_xmu, sd, _stage(dx, T))
    return sum_dy, sum_dy_xmu
