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


def _tuner_run(*rank_times: list[float], measured: list[list[float]] | None = None) -> dict:
    run = _run(*rank_times)
    for rank, t in zip(run["ranks"], measured or rank_times, strict=True):
        rank["step_times"] = t  # the measured steps (after the warm-up); step_times_all: every step of the launch
    return run


@pytest.mark.parametrize("nodes", [1, 2])
def test_the_tuners_measuring_cost_is_counted_beyond_the_pace_every_step_pays(nodes: int) -> None:
    from benchmarks.autotune import analyse

    # steps 2-3 are the tuner's measuring window (settle 2, measure 2); one node: the floor's 0.1 s is the pace;
    # two nodes: node_ddp's 0.2 s, since the DDP inside each node runs at every step, the measuring ones included
    auto = "groups_localsgd_auto" if nodes == 2 else "localsgd_auto"
    runs = {
        "floor": [_tuner_run([0.1] * 6, [0.1] * 6)],
        auto: [
            _tuner_run([0.2, 0.2, 0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.4, 0.4, 0.2, 0.2], measured=[[0.2] * 3, [0.2] * 3])
        ],
        "fixed": [_tuner_run([0.21] * 6, [0.21] * 6)],
    }
    if nodes == 2:
        runs["node_ddp"] = [_tuner_run([0.2] * 6, [0.2] * 6)]
    summary = {
        name: {"slowest_rank_step_time_s": step, "step_time_median_s": step}
        for name, step in {"floor": 0.1, "node_ddp": 0.2, auto: 0.2, "fixed": 0.21}.items()
        if name in runs
    }
    out = analyse({"summary": summary, "runs": runs}, measure_steps=2, settle_steps=2)[auto]
    pace = 0.2 if nodes == 2 else 0.1
    assert out["measuring_pace"] == ("node_ddp" if nodes == 2 else "floor")
    assert out["measuring_seconds"] == pytest.approx(1.0)  # the slower rank's 0.5 + 0.5
    assert out["measuring_cost_seconds"] == pytest.approx(1.0 - 2 * pace)
    assert out["measuring_cost_of_300_steps"] == pytest.approx((1.0 - 2 * pace) / (300 * pace))
    assert out["measuring_cost_vs_floor_steps_seconds"] == pytest.approx(1.0 - 2 * pace)
    # the rank that waited least: rank 1, 0.8 s over its own median step's 2 × 0.2 s
    assert out["measuring_own_work_seconds"] == pytest.approx(0.4)
    assert out["measuring_own_work_of_300_steps"] == pytest.approx(0.4 / (300 * pace))
    assert out["x_best_grid"] == pytest.approx(0.2 / 0.21)
