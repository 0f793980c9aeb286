"""benchmarks/check_regression.py: passes an honest re-run, fails a doctored one."""
import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "check_regression.py"


def pytest_benchmark_json(ratios, seconds=1.0):
    """A minimal file in pytest-benchmark's format, with floor ratios in extra_info."""
    return {"machine_info": {}, "commit_info": {}, "benchmarks": [
        {"fullname": f"benchmarks/test_batch_norm.py::test_batch_norm[{name}]",
         "name": f"test_batch_norm[{name}]", "stats": {"median": seconds * ratio},
         "extra_info": {"floor_ratio": ratio, "floor_s": seconds}}
        for name, ratio in ratios.items()]}


def run(tmp_path, old, new, *extra):
    paths = []
    for name, data in (("old.json", old), ("new.json", new)):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        paths.append(str(path))
    return subprocess.run([sys.executable, str(SCRIPT), *paths, *extra],
                          capture_output=True, text=True)


BASE = {"cython-NCHW": 0.95, "cython-NHWC": 0.97, "torch-NCHW": 4.1}


def test_honest_rerun_passes(tmp_path):
    # a machine twice as slow today: times double, floor ratios barely move
    rerun = {k: v * 1.04 for k, v in BASE.items()}
    result = run(tmp_path, pytest_benchmark_json(BASE), pytest_benchmark_json(rerun, 2.0))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no floor ratio grew" in result.stdout


def test_doctored_run_fails_and_names_the_benchmark(tmp_path):
    doctored = dict(BASE, **{"cython-NHWC": 0.97 * 1.25})
    result = run(tmp_path, pytest_benchmark_json(BASE), pytest_benchmark_json(doctored))
    assert result.returncode == 1
    regressed = [line for line in result.stdout.splitlines() if "REGRESSED" in line]
    assert len(regressed) == 1 and "cython-NHWC" in regressed[0]


@pytest.mark.parametrize("limit,code", [("30", 0), ("20", 1)])
def test_threshold_is_honoured(tmp_path, limit, code):
    doctored = dict(BASE, **{"torch-NCHW": 4.1 * 1.25})
    result = run(tmp_path, pytest_benchmark_json(BASE), pytest_benchmark_json(doctored),
                 "--max-increase", limit)
    assert result.returncode == code


def test_fastbn_bench_json_is_understood(tmp_path):
    def bench_json(ratio):
        return {"results": [{"contender": "cython", "op": "backward", "layout": "NC",
                             "shape": [4096, 1024], "dtype": "float32", "floor_ratio": ratio}]}
    assert run(tmp_path, bench_json(1.0), bench_json(1.05)).returncode == 0
    assert run(tmp_path, bench_json(1.0), bench_json(1.5)).returncode == 1


def test_unusable_files_exit_2(tmp_path):
    result = run(tmp_path, {"something": []}, pytest_benchmark_json(BASE))
    assert result.returncode == 2 and "neither" in result.stderr
    result = run(tmp_path, pytest_benchmark_json({"a": 1.0}), pytest_benchmark_json({"b": 1.0}))
    assert result.returncode == 2 and "share no benchmark" in result.stderr


def test_contender_filter(tmp_path):
    def with_contenders(ratios):
        data = pytest_benchmark_json(ratios)
        for b in data["benchmarks"]:
            b["extra_info"]["contender"] = b["name"].split("[")[1].split("-")[0]
        return data
    doctored = dict(BASE, **{"torch-NCHW": 4.1 * 2})  # a peer slowed down, not fastbn
    old, new = with_contenders(BASE), with_contenders(doctored)
    assert run(tmp_path, old, new).returncode == 1
    assert run(tmp_path, old, new, "--contender", "cython").returncode == 0
