"""benchmarks/step_time.py's ratios from hand-made per-rank step times (no processes)."""

from __future__ import annotations

import pytest

from benchmarks.step_time import add_ratios, summarize


def _run(*rank_times: list[float]) -> dict:
    ranks = [
        {
            "rank": r,
            "step_times": t,
            "step_times_all": t,
            "window_seconds": sum(t),
            "counter_bytes": None,
            "lo_bytes": None,
            "wait_seconds": 0.0,
            "num_params": 10,
            "param_bytes": 40,
            "num_float_buffers": 0,
        }
        for r, t in enumerate(rank_times)
    ]
    return {"ranks": ranks, "background_lo_bytes_per_s": None}


def test_the_floor_of_a_job_is_its_slowest_rank() -> None:
    # floor: rank 0 at 0.4 s/step, rank 1 at 0.3 (cores of different speed); repeat 2: 0.5 and 0.45
    floor = summarize("floor", {"kind": "floor"}, [_run([0.4, 0.4], [0.3, 0.3]), _run([0.5, 0.5], [0.45, 0.45])], 2, 2)
    # a synchronizing variant: both ranks at the pace of the slower one plus 10%
    synced = summarize("v", {"kind": "x"}, [_run([0.44, 0.44], [0.44, 0.44]), _run([0.55, 0.55], [0.55, 0.55])], 2, 2)
    summary = {"floor": floor, "v": synced}
    add_ratios(summary, world=2)
    assert floor["step_time_mean_s"] == pytest.approx(0.4125)  # pooled: (0.4+0.3+0.5+0.45)/4
    assert floor["slowest_rank_step_time_s"] == pytest.approx(0.45)  # (0.4 + 0.5)/2
    assert synced["step_time_ratio_mean_vs_floor"] == pytest.approx(0.495 / 0.4125)  # 1.2: rank speeds counted as comm
    assert synced["step_time_ratio_slowest_rank_vs_floor"] == pytest.approx(1.1)
