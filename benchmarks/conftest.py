"""pytest-benchmark suite options: ``--fastbn-size=quick|full``."""
import pytest

from fastbn import bench

SIZES = {
    # quick: 8 MB float32, past L2 and, with the caches flushed, read from memory, so the
    # floor ratio tracks bandwidth (under ~1 MB, thread wake-up dominates and it doesn't);
    # full adds in-cache (0.8 MB), L3-sized (26 MB) and out-of-cache (103 MB) shapes.
    "quick": {"NCHW": [(16, 32, 64, 64)], "NHWC": [(16, 32, 64, 64)], "NC": [(4096, 512)]},
    "full": {"NCHW": [(8, 32, 28, 28), (16, 32, 64, 64), (32, 64, 56, 56), (128, 256, 28, 28)],
             "NHWC": [(8, 32, 28, 28), (16, 32, 64, 64), (32, 64, 56, 56), (128, 256, 28, 28)],
             "NC": [(1024, 256), (4096, 512), (4096, 1024), (16384, 2048)]},
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
