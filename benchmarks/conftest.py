"""pytest-benchmark suite options: ``--fastbn-size=quick|full``."""
import pytest

from fastbn import bench

SIZES = {
    # small: in cache (~0.8 MB float32); medium: in L3 (26 MB); large: out of cache (103 MB)
    "quick": {"NCHW": [(8, 32, 28, 28)], "NHWC": [(8, 32, 28, 28)], "NC": [(1024, 256)]},
    "full": {"NCHW": [(8, 32, 28, 28), (32, 64, 56, 56), (128, 256, 28, 28)],
             "NHWC": [(8, 32, 28, 28), (32, 64, 56, 56), (128, 256, 28, 28)],
             "NC": [(1024, 256), (4096, 1024), (16384, 2048)]},
}


def pytest_addoption(parser):
    parser.addoption("--fastbn-size", choices=sorted(SIZES), default="quick",
                     help="fastbn benchmark shape set: quick (small shapes) or full "
                          "(small, medium, large)")
    parser.addoption("--fastbn-threads", type=int, default=None,
                     help="threads for every contender (default fastbn.get_num_threads())")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--fastbn-size")
    cases = [bench.Case(op, layout, shape, dtype)
             for layout, shapes in SIZES[size].items() for shape in shapes
             for dtype in ("float32", "float64", "float16") for op in bench.OPS]
    metafunc.parametrize("case", cases, ids=[c.label.replace(" ", "-") for c in cases])
    names = [info.name for info in bench._registry.backends() if "cpu" in info.devices]
    metafunc.parametrize("contender", names + list(bench.PEERS))


@pytest.fixture(scope="session")
def threads(pytestconfig):
    from fastbn import get_num_threads
    return pytestconfig.getoption("--fastbn-threads") or get_num_threads()


@pytest.fixture(scope="session")
def flush_caches():
    return bench.CacheFlusher()
