"""The CUDA kernels compile cleanly wherever nvcc exists, GPU or not.

Each module the CuPy backend loads (one per dtype, with its compile options:
float16, bfloat16, float32, float64) is compiled to PTX for sm_80 and sm_90 with
every warning an error, and must hold every kernel the backend launches, and no
other dtype's; the 16-bit modules must round their stores to nearest even. The
source with no options (every dtype in one module, cuda_bf16.h and cuda_fp16.h
together) compiles too.
"""
import importlib
import importlib.resources
import os
import re
import shutil
import subprocess

import pytest

cupy_gpu = importlib.import_module("fastbn._backends.cupy_gpu")

ARCHS = ["sm_80", "sm_90"]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (on PATH, CUDA_HOME, "
                                                     "CUDA_PATH or /usr/local/cuda)")


@pytest.fixture(scope="module")
def source_path():
    """bn_cuda.cu as installed with fastbn (package data), as a file nvcc can read."""
    resource = importlib.resources.files("fastbn._kernels").joinpath(cupy_gpu.KERNEL_SOURCE)
    with importlib.resources.as_file(resource) as path:
        yield path


def _entries(ptx):
    return set(re.findall(r"^\.visible \.entry (\w+)\(", ptx, flags=re.MULTILINE))


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", sorted(cupy_gpu.STAT_DTYPE))
def test_module_compiles_without_warnings(source_path, tmp_path, dtype, arch):
    out = tmp_path / f"bn_cuda_{dtype}_{arch}.ptx"
    cmd = [NVCC, "-ptx", f"-arch={arch}", *cupy_gpu.compile_options(dtype),
           "-Werror", "all-warnings", "-o", str(out), str(source_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report = f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert proc.stderr.strip() == "" and proc.stdout.strip() == "", report

    ptx = out.read_text()
    entries = _entries(ptx)
    expected = set(cupy_gpu.kernel_names(dtype))
    assert expected <= entries, f"missing kernels: {sorted(expected - entries)}"
    assert entries == expected, f"kernels of other dtypes compiled in: {sorted(entries - expected)}"
    # stores of 16-bit data: one rounding to nearest even (cvt.rn), from float
    rounding = {"float16": "cvt.rn.f16.f32", "bfloat16": "cvt.rn.bf16.f32"}
    for name, cvt in rounding.items():
        if name == dtype:
            assert cvt in ptx, f"{dtype}: no {cvt} in the PTX"
        else:
            assert cvt not in ptx, f"{dtype}: {name} conversions ({cvt}) compiled in"


@needs_nvcc
def test_all_dtypes_in_one_module(source_path, tmp_path):
    """No -DFASTBN_* flags: every dtype's kernels in one module (both 16-bit headers)."""
    out = tmp_path / "bn_cuda_all.ptx"
    cmd = [NVCC, "-ptx", "-arch=sm_80", "-std=c++17", "-Werror", "all-warnings", "-o",
           str(out), str(source_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report = f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert proc.stderr.strip() == "" and proc.stdout.strip() == "", report
    expected = {n for d in cupy_gpu.STAT_DTYPE for n in cupy_gpu.kernel_names(d)}
    assert _entries(out.read_text()) == expected


def test_kernel_names_cover_every_launch():
    """Names are unique and follow bn_<kernel>_<dtype>_<index>, for every dtype served."""
    assert set(cupy_gpu.STAT_DTYPE) == set(cupy_gpu.backend.dtypes)
    assert set(cupy_gpu.STAT_DTYPE) == {"float16", "bfloat16", "float32", "float64"}
    assert cupy_gpu.STAT_DTYPE["bfloat16"] == cupy_gpu.STAT_DTYPE["float16"] == "float32"
    names = [n for d in cupy_gpu.STAT_DTYPE for n in cupy_gpu.kernel_names(d)]
    assert len(names) == len(set(names)) == 14 * 2 * 4
    for dtype in cupy_gpu.STAT_DTYPE:
        for name in cupy_gpu.kernel_names(dtype):
            assert re.fullmatch(rf"bn_[a-z_]+_{dtype}_i(32|64)", name), name


# the backend's epilogue methods (fastbn._registry.EPILOGUE_KERNELS it serves) and the
# kernels each launches, in both families
EPILOGUE_KERNELS = {
    "normalize_epilogue": ("bn_normalize_epilogue_planes", "bn_normalize_epilogue_rows"),
    "backward_reduce_relu": ("bn_backward_reduce_relu_planes", "bn_backward_reduce_relu_rows"),
    "backward_elemt_relu": ("bn_backward_elemt_relu_planes", "bn_backward_elemt_relu_rows"),
}


def test_epilogue_kernels_are_named_for_every_dtype():
    """Every dtype module holds the epilogue kernels the adapter's epilogue methods launch
    (the compile tests above then check each module really defines every name)."""
    from fastbn._registry import EPILOGUE_KERNELS as PROTOCOL
    served = {k for k in PROTOCOL if getattr(cupy_gpu.backend, k, None) is not None}
    assert served == set(EPILOGUE_KERNELS)  # the fused ones need fused paths it lacks
    for kernels in EPILOGUE_KERNELS.values():
        for kernel in kernels:
            assert kernel in cupy_gpu.KERNELS
            for dtype in cupy_gpu.STAT_DTYPE:
                assert {cupy_gpu.kernel_name(kernel, dtype, i) for i in ("i32", "i64")} <= set(
                    cupy_gpu.kernel_names(dtype))


@needs_nvcc
@pytest.mark.parametrize("dtype", sorted(cupy_gpu.STAT_DTYPE))
def test_data_loads_take_the_read_only_path_and_vectors(source_path, tmp_path, dtype):
    """Every global load of data is ld.global.nc (const __restrict__ / __ldg), or .cg for
    the partials of a split reduction; the vector path loads 16 bytes (float32: v4.f32,
    float64: v2.f64) or 8 bytes of 16-bit values (v2.u32), and stores likewise."""
    out = tmp_path / f"bn_cuda_{dtype}.ptx"
    cmd = [NVCC, "-ptx", "-arch=sm_80", *cupy_gpu.compile_options(dtype), "-o", str(out),
           str(source_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ptx = out.read_text()
    loads = re.findall(r"\bld\.global(\.[a-z0-9]+)*", ptx)
    kinds = set(re.findall(r"\bld\.global\.(\w+)", ptx))
    assert loads and kinds <= {"nc", "cg"}, f"loads not on the read-only path: {sorted(kinds)}"
    vector = {"float32": "v4.f32", "float64": "v2.f64", "float16": "v2.u32",
              "bfloat16": "v2.u32"}[dtype]
    assert f"ld.global.nc.{vector}" in ptx
    assert f"st.global.{vector}" in ptx
