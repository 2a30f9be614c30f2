"""benchmarks/gpu_check.py in its CI size: the four jobs on tiny-llama on the CPU, compared with the stored
reference (equal on the same device), and its refusals."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def test_quick_check_on_the_cpu_matches_the_stored_reference(tmp_path):
    out = tmp_path / "gpu_check.json"
    status = gpu_check.main(["--quick", "--device", "cpu", "--out", str(out), "--cache", os.environ["FACTLENS_CACHE"]])
    assert status == 0
    (record,) = json.loads(out.read_text())
    assert set(record["phases"]) == {"heatmap", "locate", "memit", "wise"}
    assert all(phase["seconds"] > 0 and phase["peak_gib"] > 0 for phase in record["phases"].values())
    assert all(diff <= gpu_check.TOLERANCES[job] for job, diff in record["largest_difference"].items())


def test_differences_are_measured_per_job():
    reference = {"heatmap": {"mlp": [[0.5, float("nan")]]}, "locate": {"critical": [1, 2]}}
    assert gpu_check.largest_differences({"heatmap": {"mlp": [[0.25, float("nan")]]}}, reference) == {"heatmap": 0.25}
    assert gpu_check.largest_differences({"locate": {"critical": [2, 3]}}, reference) == {"locate": float("inf")}


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "CUDA is not available here"),
    (["--device-map", "2"], "asks for 2 CUDA devices"),
    (["--device", "cuda", "--write-reference"], "needs --device cpu"),
    (["--device", "cpu", "--device-map", "auto"], "either --device or --device-map"),
])
def test_bad_requests_exit_with_status_2_and_one_line(argv, message, tmp_path, capsys):
    argv = [*argv, "--quick", "--out", str(tmp_path / "out.json"), "--cache", os.environ["FACTLENS_CACHE"]]
    try:
        status = gpu_check.main(argv)
    except SystemExit as stop:
        status = stop.code
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
