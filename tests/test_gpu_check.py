"""benchmarks/gpu_check.py (``make gpu-check``): refuses without CUDA, judges runs with literal numbers, and its
dry run on the CPU goes end to end (so the script is known to run before a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check


def test_without_cuda_it_says_so_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "no CUDA GPU on this machine" in capsys.readouterr().out


def test_each_configuration_is_judged_against_the_cpu_run_relative_to_the_distance_trained():
    start, cpu_end = [0.0, 0.0], [3.0, 4.0]  # the CPU run moved the model by 5
    gpu = {
        "periodic/fp32/tau0/trainer": {"end": [3.0, 4.004], "seconds": 1.0, "devices": ["cuda:0"], "peak_bytes": 3000},
        "diloco/int8/tau2/fabric": {"end": [3.0, 4.01], "seconds": 1.0, "devices": ["cuda:0"]},
        "lsgd/fp32/tau0/trainer": {"error": "RuntimeError: boom", "seconds": 0.5},
        "async/fp32/tau0/trainer": {"end": [1.0, 7.0], "seconds": 1.0, "devices": ["cuda:0"]},
    }
    cpu = {name: {"start": start, "end": cpu_end} for name in gpu}
    rows = {r["configuration"]: r for r in gpu_check.compare(gpu, cpu, floor_bytes=1000.0, model_bytes=1000)}
    assert rows["periodic/fp32/tau0/trainer"]["gap"] == pytest.approx(0.004 / 5, rel=1e-4)  # float32 tensors
    assert rows["periodic/fp32/tau0/trainer"]["verdict"] == "ok"
    assert rows["periodic/fp32/tau0/trainer"]["peak_extra_copies"] == 2.0
    assert rows["diloco/int8/tau2/fabric"]["verdict"] == "MISMATCH"  # 0.002 > 1e-3
    assert rows["lsgd/fp32/tau0/trainer"]["verdict"] == "ERROR" and "boom" in rows["lsgd/fp32/tau0/trainer"]["error"]
    assert rows["async/fp32/tau0/trainer"]["verdict"] == "ok (trained; order-dependent)"


@pytest.mark.launches
def test_the_dry_run_on_the_cpu_goes_end_to_end(tmp_path):
    out = tmp_path / "gpu.md"
    only = ["periodic/int8/tau2", "diloco_cpu_anchor/fp32/tau2/trainer", "async"]
    assert gpu_check.main(["--device", "cpu", "--steps", "8", "--width", "16", "--only", *only, "--out", str(out)]) == 0
    page = out.read_text()
    for name in ("periodic/int8/tau2/trainer", "periodic/int8/tau2/fabric", "diloco_cpu_anchor/fp32/tau2/trainer"):
        assert f"| {name} | ok | 0.00e+00 |" in page
    assert "| async/fp32/tau0/trainer | ok (trained; order-dependent) |" in page
    assert "int8_quantize_dequantize_GBps" in page
