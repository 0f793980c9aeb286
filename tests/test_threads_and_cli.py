"""Thread-count control, show_config and the command line."""
import subprocess
import sys
import threading

import pytest

import fastbn


def test_omp_num_threads_sets_the_default(tmp_path):
    """Read at start-up, as OpenMP runtimes do."""
    import os
    out = subprocess.run([sys.executable, "-c", "import fastbn; print(fastbn.get_num_threads())"],
                         capture_output=True, text=True, check=True, cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="3")).stdout
    assert out.strip() == "3"


def test_num_threads_scoping():
    fastbn.set_num_threads(None)
    try:
        fastbn.set_num_threads(2)
        assert fastbn.get_num_threads() == 2
        with fastbn.num_threads(1):
            assert fastbn.get_num_threads() == 1
            seen = []
            t = threading.Thread(target=lambda: seen.append(fastbn.get_num_threads()))
            t.start()
            t.join()
            assert seen == [2]  # the context is this thread's only
        assert fastbn.get_num_threads() == 2
    finally:
        fastbn.set_num_threads(None)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                     ("2", TypeError), (True, TypeError)])
def test_num_threads_rejects(bad, exc):
    with pytest.raises(exc, match="n: expected a positive int"):
        fastbn.set_num_threads(bad)


def test_show_config_dicts():
    info = fastbn.show_config("dicts")
    assert info["fastbn"] == fastbn.__version__
    assert {"built", "openmp", "reason"} <= set(info["extension"])
    numpy_row = next(r for r in info["backends"] if r["name"] == "numpy")
    assert numpy_row["available"]


def test_cli_info(tmp_path):
    # run outside the checkout, so `-m` finds the installed fastbn, not the source tree
    out = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout
    assert f"fastbn {fastbn.__version__}" in out
    assert "numpy" in out and "available" in out
    assert "build:" in out and "threads:" in out


def test_cli_bench_smoke(tmp_path):
    """A tiny run: the table, the JSON, and the floor ratio per result."""
    import json
    path = tmp_path / "run.json"
    out = subprocess.run([sys.executable, "-m", "fastbn", "bench", "--shape", "4,3,5,5",
                          "--repeats", "1", "--backend", "numpy", "--backend", "numpy-naive",
                          "--warm", "--json", str(path)],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert "x floor" in out and "numpy-naive" in out
    results = json.loads(path.read_text())["results"]
    assert {r["contender"] for r in results} == {"numpy", "numpy-naive"}
    assert len(results) == 2 * 3 * 4  # contenders x layouts x operations
    ran = [r for r in results if "skipped" not in r]
    assert all(r["floor_ratio"] > 0 and r["threads"] >= 1 for r in ran)
    assert all(r["p90_s"] >= r["median_s"] > 0 for r in ran) and "p90 ms" in out
    skipped = [r for r in results if "skipped" in r]  # numpy-naive has no out= path
    assert {(r["contender"], r["op"]) for r in skipped} == {("numpy-naive",
                                                            "forward-training-out")}
    assert all("allocates" in r["skipped"] for r in skipped)


def test_cli_bench_rejects_unknown_backend(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastbn", "bench", "--backend", "nope"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "nope" in result.stderr


def test_threadpoolctl_limits_reach_the_default():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not fastbn.show_config("dicts")["extension"]["openmp"]:
        pytest.skip("the extension was built without OpenMP")
    fastbn.set_num_threads(None)
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert fastbn.get_num_threads() == 1
    with fastbn.num_threads(2), threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert fastbn.get_num_threads() == 2  # an explicit count still wins
