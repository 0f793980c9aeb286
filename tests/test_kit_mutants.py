"""Mutation test of the conformance kit: deliberately broken backends, each caught.

Every mutant is the NumPy reference with one bug a real backend could have; the
kit must reject it with a message naming the kernel at fault. A kit that lets a
mutant through is missing a check.
"""
import numpy as np
import pytest

from fastbn.testing import BackendCheckError, ReferenceBackend, check_backend


def _per_channel(v):
    return np.asarray(v, dtype=np.float64)[:, None]


def _stat(x3):
    return np.float64 if x3.dtype == np.float64 else np.float32


class Mutant(ReferenceBackend):
    """The reference under another name, not registered: passed to the kit as an object."""

    priority = -100

    def __init__(self):
        self.name = f"mutant-{type(self).__name__}"


class UnbiasedM2(Mutant):
    """m2 scaled by n/(n-1), as if the running variance's correction leaked into it."""

    def stats(self, x3):
        mean, m2 = super().stats(x3)
        n = x3.shape[0] * x3.shape[2]
        return mean, (m2 * n / (n - 1)).astype(m2.dtype)


class VarianceForM2(Mutant):
    """Returns the variance m2/n where the contract asks for the sum m2."""

    def stats(self, x3):
        mean, m2 = super().stats(x3)
        return mean, (m2 / (x3.shape[0] * x3.shape[2])).astype(m2.dtype)


class DropsKc(Mutant):
    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        super().backward_elemt(dy3, x3, mean, k_dy, k_x, np.zeros_like(k_c), dx3)


class DropsKx(Mutant):
    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        super().backward_elemt(dy3, x3, mean, k_dy, np.zeros_like(k_x), k_c, dx3)


class WrongAxis(Mutant):
    """Reads planes as if they were rows: right for I == 1, wrong otherwise."""

    def stats(self, x3):
        o, c, i = x3.shape
        x = x3.astype(np.float64).reshape(o, i, c)
        mean = x.mean(axis=(0, 1))
        m2 = np.square(x - mean).sum(axis=(0, 1))
        return mean.astype(_stat(x3)), m2.astype(_stat(x3))


class WrongInPlace(Mutant):
    """Starts y3 from the shift, then adds: fine into a separate y3, wrong when y3 is x3."""

    def normalize(self, x3, mean, scale, shift, y3):
        y3[...] = _per_channel(shift)
        y3 += (x3.astype(np.float64) - _per_channel(mean)) * _per_channel(scale)


class FusedForwardWrong(Mutant):
    """The fused forward forgets eps; the four kernels are right."""

    def forward_train(self, x3, weight, bias, eps, y3):
        mean, m2 = self.stats(x3)
        n = x3.shape[0] * x3.shape[2]
        self.normalize(x3, mean, weight / np.sqrt(m2 / n), bias, y3)
        return mean, m2


class ComposedBackwardWrong(Mutant):
    """The fused backward is right; backward_elemt (used in inference) drops k_c."""

    def backward_train(self, dy3, x3, mean, invstd, weight, dx3):
        sum_dy, sum_dy_xmu = self.backward_reduce(dy3, x3, mean)
        n = x3.shape[0] * x3.shape[2]
        k_dy = weight * invstd
        super().backward_elemt(dy3, x3, mean, k_dy, -k_dy * invstd * invstd * sum_dy_xmu / n,
                               -k_dy * sum_dy / n, dx3)
        return sum_dy, sum_dy_xmu

    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        super().backward_elemt(dy3, x3, mean, k_dy, k_x, np.zeros_like(k_c), dx3)


class WritesBeforeDeclining(Mutant):
    """Declines one-channel inputs, but only after zeroing the output."""

    def normalize(self, x3, mean, scale, shift, y3):
        if x3.shape[1] == 1:
            y3[...] = 0
            return NotImplemented
        return super().normalize(x3, mean, scale, shift, y3)


class IgnoresShift(Mutant):
    def normalize(self, x3, mean, scale, shift, y3):
        super().normalize(x3, mean, scale, np.zeros_like(shift), y3)


class WrongLength(Mutant):
    """One mean and m2 for all channels: shape (1,), which NumPy would broadcast."""

    def stats(self, x3):
        x = x3.astype(np.float64)
        return (np.array([x.mean()], _stat(x3)),
                np.array([np.square(x - x.mean()).sum()], _stat(x3)))


class WritesACopy(Mutant):
    """Normalizes into a new array and drops it."""

    def normalize(self, x3, mean, scale, shift, y3):
        super().normalize(x3, mean, scale, shift, np.empty_like(y3))


class ReturnsNewArray(Mutant):
    """Returns y instead of writing y3."""

    def normalize(self, x3, mean, scale, shift, y3):
        y = np.empty_like(y3)
        super().normalize(x3, mean, scale, shift, y)
        return y


class Float16Truncates(Mutant):
    """Rounds float16 outputs toward zero instead of to nearest."""

    def normalize(self, x3, mean, scale, shift, y3):
        if y3.dtype != np.float16:
            return super().normalize(x3, mean, scale, shift, y3)
        y = ((x3.astype(np.float64) - _per_channel(mean)) * _per_channel(scale)
             + _per_channel(shift)).astype(np.float32)
        y16 = y.astype(np.float16)
        over = np.abs(y16.astype(np.float32)) > np.abs(y)   # rounded away from zero
        bits = y16.view(np.uint16)
        bits[over] -= 1                                     # one ulp back toward zero
        y3[...] = y16


class SharedScratch(Mutant):
    """Keeps its work buffer on the backend object: a race between threads."""

    def __init__(self):
        super().__init__()
        self._scratch = {}

    def stats(self, x3):
        buf = self._scratch.get(x3.shape)
        if buf is None:
            buf = self._scratch[x3.shape] = np.empty(x3.shape)
        buf[...] = x3
        mean = buf.mean(axis=(0, 2))
        buf -= _per_channel(mean)
        np.square(buf, out=buf)
        return mean.astype(_stat(x3)), buf.sum(axis=(0, 2)).astype(_stat(x3))


class SwappedSums(Mutant):
    def backward_reduce(self, dy3, x3, mean):
        sum_dy, sum_dy_xmu = super().backward_reduce(dy3, x3, mean)
        return sum_dy_xmu, sum_dy


class DropsNaN(Mutant):
    """nan-aware sums: a NaN vanishes from its channel's statistics."""

    def stats(self, x3):
        x = x3.astype(np.float64)
        mean = np.nanmean(x, axis=(0, 2))
        m2 = np.nansum(np.square(x - _per_channel(mean)), axis=(0, 2))
        return mean.astype(_stat(x3)), m2.astype(_stat(x3))


class NaiveFloat32Variance(Mutant):
    """E[x^2] - E[x]^2 in float32: fine for centred data, garbage for a large mean."""

    def stats(self, x3):
        if x3.dtype == np.float64:
            return super().stats(x3)
        x = x3.astype(np.float32)
        n = np.float32(x3.shape[0] * x3.shape[2])
        s1 = x.sum(axis=(0, 2), dtype=np.float32)
        s2 = np.square(x).sum(axis=(0, 2), dtype=np.float32)
        mean = s1 / n
        return mean.astype(_stat(x3)), (s2 - n * mean * mean).astype(_stat(x3))


class Float64Statistics(Mutant):
    """Returns float64 statistics for float32 data."""

    def stats(self, x3):
        return tuple(v.astype(np.float64) for v in super().stats(x3))


class ModifiesInput(Mutant):
    """Centres x3 in place to save a buffer."""

    def backward_reduce(self, dy3, x3, mean):
        x3 -= _per_channel(mean).astype(x3.dtype)
        dy = dy3.astype(np.float64)
        return dy.sum(axis=(0, 2)).astype(_stat(x3)), (dy * x3).sum(axis=(0, 2)).astype(
            _stat(x3))


class FirstChannelBlockOnly(Mutant):
    """Normalizes only the first 512 channels (a blocking bug)."""

    def normalize(self, x3, mean, scale, shift, y3):
        k = min(512, x3.shape[1])
        y3[:, k:] = 0
        super().normalize(x3[:, :k], mean[:k], scale[:k], shift[:k], y3[:, :k])


class FusedBackwardReturnsDweight(Mutant):
    """The fused backward returns sum_dy_xmu * invstd (dweight) for sum_dy_xmu."""

    def backward_train(self, dy3, x3, mean, invstd, weight, dx3):
        sum_dy, sum_dy_xmu = self.backward_reduce(dy3, x3, mean)
        n = x3.shape[0] * x3.shape[2]
        k_dy = weight * invstd
        self.backward_elemt(dy3, x3, mean, k_dy, -k_dy * invstd * invstd * sum_dy_xmu / n,
                            -k_dy * sum_dy / n, dx3)
        return sum_dy, (sum_dy_xmu * invstd).astype(sum_dy.dtype)


class WrongOnHugeChannel(Mutant):
    """Stops a plane after 2**17 values (a tile counter that wraps)."""

    def stats(self, x3):
        if x3.shape[2] <= 1 << 17:
            return super().stats(x3)
        return super().stats(np.ascontiguousarray(x3[:, :, :1 << 17]))


class ReluDropsNaN(Mutant):
    """relu as fmax(v, 0): NaN becomes 0, where torch.relu keeps NaN."""

    def normalize_epilogue(self, x3, mean, scale, shift, z3, relu, y3):
        super().normalize_epilogue(x3, mean, scale, shift, z3, False, y3)
        if relu:
            np.fmax(y3, 0, out=y3)


class MaskAtZero(Mutant):
    """The gradient mask taken where y >= 0: y == 0 (a clipped value) passes its gradient."""

    def backward_elemt_relu(self, dy3, y3, x3, mean, k_dy, k_x, k_c, dz3, dx3):
        g = np.where(y3 >= 0, dy3, 0).astype(dy3.dtype)
        self.backward_elemt(g, x3, mean, k_dy, k_x, k_c, dx3)
        if dz3 is not None:
            dz3[...] = g


class ResidualReadAfterWrite(Mutant):
    """Writes y3 before reading z3: right into a separate y3, wrong for out=residual."""

    def normalize_epilogue(self, x3, mean, scale, shift, z3, relu, y3):
        self.normalize(x3, mean, scale, shift, y3)
        if z3 is not None:
            y3 += z3
        if relu:
            np.maximum(y3, 0, out=y3)


class ForgetsDz(Mutant):
    """The residual's gradient is never written."""

    def backward_elemt_relu(self, dy3, y3, x3, mean, k_dy, k_x, k_c, dz3, dx3):
        super().backward_elemt_relu(dy3, y3, x3, mean, k_dy, k_x, k_c, None, dx3)


# mutant -> the kernel the kit must name
CATALOGUE = {
    UnbiasedM2: "stats",
    VarianceForM2: "stats",
    DropsKc: "backward_elemt",
    DropsKx: "backward_elemt",
    WrongAxis: "stats",
    WrongInPlace: "normalize",
    FusedForwardWrong: "forward_train",
    ComposedBackwardWrong: "backward_elemt",
    WritesBeforeDeclining: "normalize",
    IgnoresShift: "normalize",
    WrongLength: "stats",
    WritesACopy: "normalize",
    ReturnsNewArray: "normalize",
    Float16Truncates: "normalize",
    SharedScratch: "stats",
    SwappedSums: "backward_reduce",
    DropsNaN: "stats",
    NaiveFloat32Variance: "stats",
    Float64Statistics: "stats",
    ModifiesInput: "backward_reduce",
    FirstChannelBlockOnly: "normalize",
    FusedBackwardReturnsDweight: "backward_train",
    WrongOnHugeChannel: "stats",
    ReluDropsNaN: "normalize_epilogue",
    MaskAtZero: "backward_elemt_relu",
    ResidualReadAfterWrite: "normalize_epilogue",
    ForgetsDz: "backward_elemt_relu",
}


def test_the_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 15


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mutant", list(CATALOGUE), ids=lambda m: m.__name__)
def test_mutant_is_caught_naming_its_kernel(mutant):
    kernel = CATALOGUE[mutant]
    with pytest.raises(BackendCheckError, match=rf"\(kernel '{kernel}', ") as caught:
        check_backend(mutant())
    assert f"backend 'mutant-{mutant.__name__}'" in str(caught.value)


def test_the_reference_passes_the_kit():
    """The kit's oracle against itself: every check runs and passes."""
    ran = check_backend(Mutant())
    assert "stats[float32-cpu]" in ran and "concurrent_calls[float64-cpu]" in ran


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the race scrambles sums into overflow
def test_race_mutant_is_caught_every_time():
    """The race needs threads to interleave; the kit forces that, so no flakes."""
    for _ in range(3):
        with pytest.raises(BackendCheckError, match="8 threads"):
            check_backend(SharedScratch(), dtypes=["float32"])
