"""The benchmarks' shared helpers (benchmarks/common.py) against hand-computed numbers."""

import math

import pytest

from benchmarks.common import (
    ddp_closed_form_bytes_per_step,
    fmt,
    fmt_spec,
    interleaved_schedule,
    load_text,
    time_held,
    time_to,
    time_to_interpolated,
)


def records(values, clock=None, **columns):
    clock = clock or [float(i + 1) for i in range(len(values))]
    return [
        {"value": v, "train_seconds": t, **{k: c[i] for k, c in columns.items()}}
        for i, (v, t) in enumerate(zip(values, clock))
    ]


def test_time_to_is_the_first_record_at_or_above_the_target():
    recs = records([0.5, 0.9, 0.8, 0.95], step=[8, 16, 24, 32])
    assert time_to(recs, 0.9) == 2.0 and time_to(recs, 0.91) == 4.0 and time_to(recs, 0.99) is None
    assert time_to(recs, 0.9, clock="step") == 16 and time_to(recs, 0.5) == 1.0
    assert time_to([], 0.1) is None


def test_time_to_a_falling_curve_is_the_first_at_or_below():
    rows = [(0.9, 0.0, 0), (0.2, 3.5, 16), (0.06, 7.0, 32), (0.05, 10.5, 48), (0.07, 14.0, 64)]
    points = [{"test_error": e, "wall_s": t, "step": s} for e, t, s in rows]
    below = {"value": "test_error", "lower_is_better": True}
    assert time_to(points, 0.05, "wall_s", **below) == 10.5
    assert time_to(points, 0.06, "step", **below) == 32
    assert time_to(points, 0.04, "wall_s", **below) is None
    # held: 0.07 at the end breaks 0.05 and 0.06; 0.2 holds from step 16 on
    assert time_held(points, 0.06, "step", **below) is None and time_held(points, 0.2, "step", **below) == 16


def test_time_held_is_the_first_record_after_which_all_stay_at_or_above():
    recs = records([0.5, 0.9, 0.8, 0.95, 0.9], step=[8, 16, 24, 32, 40])
    assert time_held(recs, 0.9) == 4.0  # 0.9 at t=2 does not count: 0.8 follows
    assert time_held(recs, 0.8) == 2.0 and time_held(recs, 0.5) == 1.0
    assert time_held(recs, 0.91) is None  # the last record is below
    assert time_held(recs, 0.9, clock="step") == 32


def test_time_to_interpolated_crosses_linearly_between_points():
    curve = [{"time": 0.0, "val_loss": 3.0}, {"time": 10.0, "val_loss": 2.0}, {"time": 20.0, "val_loss": 1.0}]
    assert time_to_interpolated(curve, 2.5) == 5.0  # halfway down the first segment
    assert time_to_interpolated(curve, 1.2) == 18.0  # 2.0 -> 1.0 over 10 s: 0.8 of the way
    assert time_to_interpolated(curve, 1.0) == 20.0 and time_to_interpolated(curve, 0.9) is None
    shuffled = [curve[2], curve[0], curve[1]]  # sorted by time first
    assert time_to_interpolated(shuffled, 2.5) == 5.0
    flat = [{"time": 0.0, "val_loss": 2.0}, {"time": 4.0, "val_loss": 2.0}]
    assert time_to_interpolated(flat, 2.0) == 4.0  # a segment's end decides, also when its start is there
    by_updates = [{"updates": 0, "loss": 4.0}, {"updates": 4, "loss": 2.0}]
    assert time_to_interpolated(by_updates, 3.0, clock="updates", value="loss") == 2.0


def test_fmt_scales_rounds_and_dashes_missing_numbers():
    assert fmt(0.98765, 100, 2) == "98.77"
    assert fmt(123456.0, 1e-3, 1) == "123.5"
    assert fmt(2 / 3) == "0.667"
    assert fmt(7, 1, 0) == "7"
    assert fmt(None) == "-" and fmt(math.nan, 100, 2) == "-"


def test_fmt_spec_formats_with_a_format_spec():
    assert fmt_spec(0.0123, "+.1%") == "+1.2%"
    assert fmt_spec(-0.5, "+8.1%") == "  -50.0%"
    assert fmt_spec(3.14159, "7.3f") == "  3.142"
    assert fmt_spec(None, ".2f") == "-"


def test_ddp_closed_form_is_a_ring_allreduce_of_the_fp32_gradient():
    assert ddp_closed_form_bytes_per_step(1000, 2) == 4000.0  # 2·(1/2)·4·1000
    assert ddp_closed_form_bytes_per_step(16938, 4) == 101628.0  # 2·(3/4)·4·16938
    assert ddp_closed_form_bytes_per_step(10, 4, bytes_per_value=2) == 30.0


def test_interleaved_schedule_rotates_the_order_and_the_seed():
    got = [(s["variant"], s["repeat"], s["seed"]) for s in interleaved_schedule(["a", "b", "c"], 3, 10)]
    assert got == [
        ("a", 0, 10),
        ("b", 0, 10),
        ("c", 0, 10),
        ("b", 1, 11),
        ("c", 1, 11),
        ("a", 1, 11),
        ("c", 2, 12),
        ("a", 2, 12),
        ("b", 2, 12),
    ]


def test_load_text_spans_the_recorded_one_minute_loads(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    summary = {
        "variants": {
            "ddp": {"loadavg_before_each": [[3.04, 1, 1], None]},
            "lsgd": {"loadavg_before_each": [[9.96, 5, 5], [4.5, 2, 2]]},
        }
    }
    assert load_text(summary) == ", load avg 3.0-10.0 on 2 cores"
    assert load_text({"variants": {"ddp": {"loadavg_before_each": [None]}}}) == ""


@pytest.mark.parametrize(
    "module",
    [
        "gradalign_label_skew",
        "lsgd_vs_easgd",
        "step_time",
        "async_repro",
        "async_report",
        "modified_local_gd_finetune",
        "overlap_quality",
        "diloco_short_rounds",
    ],
)
def test_no_benchmark_keeps_a_private_copy_of_the_shared_helpers(module):
    import importlib

    import benchmarks.common as common

    mod = importlib.import_module(f"benchmarks.{module}")
    for name in ("_fmt", "launch", "first_time_below", "write_report", "make_probe_callback", "environment"):
        assert getattr(mod, name, getattr(common, name, None)) is getattr(common, name, None), (module, name)
    if hasattr(mod, "time_to"):
        assert mod.time_to is common.time_to
