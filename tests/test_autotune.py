"""The auto-tuner's decision function with literal measurements, and its bounds (docs/autotune.md)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lightning_localsgd import AutoTune, DiLoCo, ElasticAveraging, PeriodicAveraging
from lightning_localsgd.transport.collectives import DryCollectives, Group
from lightning_localsgd.tuning import tuner as tuner_module
from lightning_localsgd.tuning.model import Decision, Measurements, decide, link_seconds, overhead, wire_bytes
from lightning_localsgd.tuning.tuner import AutoTuner

# resnet18-sized: 11.25 M fp32 values (45 MB), 2 replicas, 150 ms steps, 1 Gbit/s (125 MB/s), 1 ms latency;
# local steps 30 % slower while a transfer runs; local work 2 / 4 / 8 / 10 ns per value
MEAS = Measurements(
    step_seconds=0.15,
    latency=0.001,
    bandwidth=125e6,
    slowdown=0.3,
    convert={"full": 2e-9, "bfloat16": 4e-9, "int8": 8e-9, "int4": 10e-9},
    numel=11_250_000,
    replicas=2,
)


def test_wire_bytes_are_the_transports_bookings():
    # fp32 allreduce of n values + 2 flags over 2 ranks: 2·(1/2)·(n+2)·4 bytes
    assert wire_bytes(None, 1000, 2, 4) == 4008.0
    assert wire_bytes("bfloat16", 1000, 2, 4) == 2004.0
    # int8: chunk = ⌈1000/256⌉·128 = 512 values, packet 512 + 4·4 = 528 bytes, all-to-all + all-gather: 2·528,
    # plus the 2 flags' allreduce (8 bytes)
    assert wire_bytes("int8", 1000, 2, 4) == 2 * 528 + 8
    assert wire_bytes("int4", 1000, 2, 4) == 2 * (256 + 16) + 8
    assert wire_bytes(None, 1000, 1, 4) == 0.0
    assert link_seconds(MEAS, None, MEAS.numel) == pytest.approx(0.001 + 45_000_008 / 125e6)


def test_the_cost_model_with_literal_numbers():
    # full precision, blocking: t_link 0.361 s + t_cpu 0.0225 s per round of H·0.15 s
    assert overhead(MEAS, None, 86, 0, 1) == pytest.approx((0.361000064 + 0.0225) / (86 * 0.15))
    # overlapped with τ = 4 (0.6 s ≥ 0.361 s): hidden, but 30 % slower steps while it travels, and the CPU work
    assert overhead(MEAS, None, 30, 4, 1) == pytest.approx((0.3 * 0.361000064 + 0.0225) / (30 * 0.15))
    # τ = 1 hides only 0.15 s of it: 0.211 s exposed
    assert overhead(MEAS, None, 30, 1, 1) == pytest.approx((0.211000064 + 0.3 * 0.15 + 0.0225) / 4.5)
    # the link cannot carry a round's fragments within the round: overlap is impossible
    assert math.isinf(overhead(MEAS, None, 2, 1, 1))
    assert overhead(MEAS, None, 86, 0, 1, extra=0.15) == pytest.approx((0.383500064 + 0.15) / (86 * 0.15))


def test_150ms_steps_125MBps_45MB_model_pick_bfloat16_every_23_steps_behind_4_steps():
    # At the smallest H meeting 3 %, H = 23, only bfloat16 meets it: overlapped, its transfer (0.181 s whole,
    # 0.091 s per half, 0.046 s per quarter, 0.0235 s per eighth) hides behind τ = ⌈2.5·t_link/0.15⌉ = 4, 2, 1, 1
    # steps and costs P·(0.3·t_link + κ·n/P) per round: 0.0993 s (2.88 %) with P = 1, 0.0996 s (2.89 %) with
    # P = 2, 0.1002 s (2.90 %) with P = 4, 0.1014 s (2.94 %) with P = 8: all meet, the fewest fragments win (1),
    # with the τ that hides them (4).
    # full: 0.3·0.361 + 0.0225 → H ≥ 30; int8: 0.3·0.0958 + 0.09 → H ≥ 27; int4: 0.3·0.0508 + 0.1125 → H ≥ 29
    decision = decide(MEAS, AutoTune())
    assert (decision.comm_dtype, decision.sync_every, decision.overlap_steps, decision.fragments) == (
        "bfloat16",
        23,
        4,
        1,
    )
    assert decision.met and decision.overhead == pytest.approx((0.3 * 0.181000032 + 0.045) / 3.45, rel=1e-6)
    # with the margin of 1.25, τ = ⌈1.25·0.181/0.15⌉ = 2
    d = decide(MEAS, AutoTune(margin=1.25))
    assert (d.comm_dtype, d.sync_every, d.overlap_steps, d.fragments) == ("bfloat16", 23, 2, 1)


def test_the_overlap_bookkeeping_is_counted_for_overlapped_syncs_only():
    # κ_overlap = 2 ns per value: 0.0225 s per overlapped sync of the whole model (snapshot, buffer, merge)
    meas = dataclasses.replace(MEAS, convert={**MEAS.convert, "overlap": 2e-9})
    assert overhead(meas, None, 30, 4, 1) == pytest.approx((0.3 * 0.361000064 + 0.0225 + 0.0225) / 4.5)
    assert overhead(meas, None, 86, 0, 1) == overhead(MEAS, None, 86, 0, 1)  # a blocking sync does not pay it
    # bfloat16 overlapped now costs 0.3·0.181 + 0.045 + 0.0225 = 0.1218 s per round: H ≥ 27.1 → 28 (2.90 %)
    d = decide(meas, AutoTune())
    assert (d.comm_dtype, d.sync_every, d.overlap_steps, d.fragments) == ("bfloat16", 28, 4, 1)
    assert d.overhead == pytest.approx((0.3 * 0.181000032 + 0.045 + 0.0225) / (28 * 0.15), rel=1e-6)
    # at 40 ns per value (0.45 s per sync) overlap never pays: int4 blocking, 0.0508 + 0.1125 s, H ≥ 36.3 → 37
    meas = dataclasses.replace(MEAS, convert={**MEAS.convert, "overlap": 40e-9})
    d = decide(meas, AutoTune())
    assert (d.comm_dtype, d.sync_every, d.overlap_steps, d.fragments) == ("int4", 37, 0, 1)


def test_the_tuner_overlaps_only_rounds_that_keep_up_with_the_margin():
    # 100 Mbit/s (12.5 MB/s) and steps only 2 % slower beside a transfer: bfloat16's transfer takes
    # 0.001 + 22.5 MB / 12.5 MB/s = 1.801 s, and overlapped it costs 0.02·1.801 + 0.045 = 0.081 s per round,
    # which the model puts under 3 % from H = 19 (0.081 / 2.85 = 2.84 %; at H = 18, 3.0007 %), τ = 18: a round of
    # 2.85 s would carry a sync that stays in flight up to 2.3 × 1.801 s, so the merges would wait. With the margin
    # the tuner overlaps only where H·0.15 ≥ 2.5·1.801 s (H ≥ 31); below that, int8 (0.931 s: overlapped from
    # H ≥ 15.5) meets 3 % first: 0.02·0.931 + 0.09 = 0.1086 s per round, H ≥ 24.1 → 25, τ = ⌈2.5·0.931/0.15⌉ = 16.
    meas = dataclasses.replace(MEAS, bandwidth=12.5e6, slowdown=0.02)
    assert overhead(meas, "bfloat16", 18, 17, 1) > 0.03 > overhead(meas, "bfloat16", 19, 18, 1)
    d = decide(meas, AutoTune())
    assert (d.comm_dtype, d.sync_every, d.overlap_steps, d.fragments) == ("int8", 25, 16, 1)
    assert d.overhead == pytest.approx((0.02 * 0.93114016 + 0.09) / 3.75, rel=1e-6)
    # with a margin of 1 the edge is the link's own time: bfloat16 from H = 19, τ = ⌈1.801/0.15⌉ = 13
    d = decide(meas, AutoTune(margin=1.0))
    assert (d.comm_dtype, d.sync_every, d.overlap_steps, d.fragments) == ("bfloat16", 19, 13, 1)
    # an overlap the user gave is theirs: kept at the edge (only a round the link cannot carry at all is refused)
    d = decide(meas, AutoTune(), comm_dtype="bfloat16", overlap_steps=18)
    assert (d.sync_every, d.overlap_steps) == (19, 18)


def test_each_fixed_argument_is_the_only_candidate():
    # the format fixed to full precision: overlap hides the whole transfer (0.361 s) behind τ = ⌈2.5·0.361/0.15⌉
    # = 7 steps from H = 30 (0.3·0.361 + 0.0225 = 0.1308 s per 4.5 s round, 2.91 %)
    d = decide(MEAS, AutoTune(), comm_dtype=None)
    assert (d.comm_dtype, d.sync_every, d.overlap_steps, d.fragments) == (None, 30, 7, 1)
    # ... and blocking: H ≥ 0.3835 / (0.03·0.15) = 85.2
    d = decide(MEAS, AutoTune(), comm_dtype=None, overlap_steps=0, fragments=1)
    assert (d.sync_every, d.overlap_steps, d.fragments) == (86, 0, 1)
    # an algorithm that cannot overlap: int4 blocking, 0.0508 + 0.1125 s per round, H ≥ 36.3
    d = decide(MEAS, AutoTune(), overlappable=False)
    assert (d.comm_dtype, d.sync_every, d.overlap_steps, d.fragments) == ("int4", 37, 0, 1)
    # H fixed: the format and τ that are cheapest at that H are taken, H is not changed
    d = decide(MEAS, AutoTune(), sync_every=8)
    assert d.sync_every == 8 and not d.met and d.notes
    d = decide(MEAS, AutoTune(), sync_every=512, overlap_steps=7, fragments=1, comm_dtype="int8")
    assert (d.comm_dtype, d.sync_every, d.overlap_steps, d.fragments) == ("int8", 512, 7, 1)


def test_the_bounds_and_the_formats_allowed_are_kept():
    d = decide(MEAS, AutoTune(sync_every=(40, 64)))
    assert d.sync_every == 40 and d.comm_dtype is None  # at H = 40 full precision already meets 3 %
    d = decide(MEAS, AutoTune(formats=(None, "int8")))
    assert d.comm_dtype == "int8" and d.sync_every == 27
    d = decide(MEAS, AutoTune(sync_every=(8, 16)))  # nothing meets 3 % below 17: the cheapest, said so
    assert not d.met and d.sync_every == 16 and "no setting meets" in d.notes[0]
    one = Measurements(**{**MEAS.as_dict(), "replicas": 1})  # a single replica: nothing travels
    assert decide(one, AutoTune()).sync_every == 8


def test_records_round_trip():
    d = decide(MEAS, AutoTune())
    assert Decision.from_dict(d.as_dict()) == d
    assert Measurements.from_dict(MEAS.as_dict()) == MEAS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sync_every=(64, 8)), "H_min must not exceed H_max"),
        (dict(overhead=0), "overhead"),
        (dict(overhead=-0.1), "overhead"),
        (dict(sync_every=(0, 8)), "H_min"),
        (dict(formats=("float8",)), "formats"),
        (dict(measure_steps=2), "measure_steps"),
        (dict(settle_steps=-1), "settle_steps"),
        (dict(margin=0.5), "margin"),
    ],
)
def test_bad_bounds_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoTune(**kwargs)


def test_what_cannot_be_tuned_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="cannot be auto-tuned"):
        ElasticAveraging(sync_every="auto")
    with pytest.raises(ValueError, match="node_sync_every"):
        PeriodicAveraging(sync_every="auto", node_sync_every=2)
    tuner = AutoTuner(AutoTune(sync_every=(8, 64)))
    with pytest.raises(ValueError, match="overlap_steps=8 must be smaller"):
        tuner.check(PeriodicAveraging(sync_every="auto", overlap_steps=8), None)
    with pytest.raises(ValueError, match="has no effect"):
        tuner.check(PeriodicAveraging(sync_every=8), None)  # autotune given, nothing left to it
    with pytest.raises(ValueError, match="gradient modifier"):
        tuner.check(DiLoCo(sync_every="auto"), object())
    with pytest.raises(ValueError, match="comm_dtype='auto'"):
        AutoTuner(tune_format=True).check(ElasticAveraging(sync_every=4), None)
    with pytest.raises(TypeError, match="AutoTune"):
        AutoTuner({"overhead": 0.05})  # type: ignore[arg-type]
    algorithm = DiLoCo(sync_every="auto", overlap_steps="auto", fragments="auto", merge_alpha=0.5)
    assert algorithm.auto == {"sync_every", "overlap_steps", "fragments"} and algorithm.awaiting_tune


def test_checks_fall_on_whole_rounds_and_a_new_setting_is_checked_after_two():
    tuner = AutoTuner(AutoTune(retune_every=100))

    def checks(period: int, until: int) -> list[int]:
        return [k for k in range(until + 1) if tuner._due(k, period)]

    assert checks(12, 400) == [24, 132, 240, 348]  # 2 rounds, then 100 rounded up to 9 rounds = 108 steps
    assert checks(128, 700) == [256, 384, 512, 640]  # 2 rounds, then every round (128 ≥ 100)
    assert checks(4, 300) == [16, 116, 216]  # at least 16 steps before the first, then 25 rounds
    assert checks(1, 40) == [16]  # H = 1: 16 steps, then every 100


def test_a_check_does_not_trust_measuring_steps_that_ran_slow():
    """The measuring steps ran at 170 ms, the steps since at 120 ms with a 300 ms sync every 8 and a sync always in
    flight (no clean step): the floor is the period's median step (120 ms), not 170 ms, so the 31 % overhead is
    seen (H = 8 marked too short, the missed cost learned) instead of a 'free' period that would shorten H."""
    from types import SimpleNamespace

    meas = Measurements(0.17, 1e-3, 125e6, 0.1, {"full": 1e-10, "bfloat16": 2e-10, "int8": 1e-9, "int4": 2e-9}, 1000, 2)
    first = decide(meas, AutoTune(sync_every=(8, 256)), comm_dtype=None, sync_every=8, overlap_steps=1, fragments=1)
    algorithm = SimpleNamespace(
        interruptions=0, in_flight=True, num_syncs=0, schedule_start=0, sync_every=8, overlap_steps=1, fragments=1,
        auto={"sync_every", "overlap_steps"}, overlappable=True,
        tuning_record={"measurements": meas.as_dict(), "decision": first.as_dict(), "history": []},
    )  # fmt: skip
    tuner = AutoTuner(AutoTune(sync_every=(8, 256)))
    tuner._algorithm, tuner._ctx = algorithm, SimpleNamespace(comm=SimpleNamespace(comm_dtype=None))  # type: ignore[assignment]
    tuner._agree = lambda values: values  # type: ignore[method-assign]  # one process: its own figures
    tuner._broadcast = lambda decision: decision  # type: ignore[method-assign]
    applied: list[Decision] = []
    tuner._apply = lambda step, decision, first: applied.append(decision)  # type: ignore[method-assign]
    from lightning_localsgd.tuning.tuner import _Watch

    tuner._check = _Watch(interruptions=0)
    now = 0.0
    for step in range(1, 17):
        now += 0.12 + (0.3 if step % 8 == 0 else 0.0)
        tuner._watch(step, now)
    (entry,) = algorithm.tuning_record["history"]
    assert entry["step"] == 16 and entry["floor"] == pytest.approx(0.12)
    assert entry["measured"] == pytest.approx((15 * 0.12 + 2 * 0.3) / 15 / 0.12 - 1)  # 15 intervals, 2 syncs: 1/3
    assert algorithm.tuning_record["too_short"] == 8
    # the new schedule waits for the sync in flight to merge at its own step (no drain, no wait for a transfer)
    assert applied == [] and algorithm.tuning_record["decision"]["sync_every"] == 8
    tuner._watch(17, now + 0.12)  # still in flight
    assert applied == []
    algorithm.in_flight = False  # merged at step 18 (τ = 1)
    tuner._watch(18, now + 0.24)
    assert len(applied) == 1 and applied[0].sync_every > 8 and applied[0].extra > 0 and entry["applied"] == 18
    assert algorithm.tuning_record["decision"] == applied[0].as_dict()


def test_the_dry_transport_runs_the_local_work_and_sends_nothing():
    """DryCollectives: the real mean_ arithmetic over 2 ranks with this rank's values as the "sum" (a sum of one)."""
    group = Group(None, [0, 1], 0)
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    dry = DryCollectives()
    dry.mean_([a, b], group)
    assert a.tolist() == [0.5, 1.0] and b.tolist() == [1.5]  # (x)/2
    x, anchor = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 1.0, 2.0])
    dry = DryCollectives(comm_dtype="bfloat16")
    dry.mean_([x], group, anchor=anchor)
    assert x.tolist() == [0.5, 1.5, 3.0]  # anchor + (x − anchor)/2
    x, residual = torch.linspace(-1, 1, 300), torch.zeros(300)
    dry = DryCollectives(comm_dtype="int8")
    dry.mean_([x], group, anchor=torch.zeros(300), residual=residual)
    # an integer wire's result means nothing (the all-to-all hands back this rank's own chunks) but stays finite
    assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(residual).all()) and x.abs().max() <= 1
    assert dry.counters.bytes_sent == 0 and dry.counters.calls == 0


def test_timing_the_wire_formats_leaves_the_model_alone(monkeypatch):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    before = [p.detach().clone() for p in module.parameters()]
    monkeypatch.setattr(tuner_module, "SAMPLE", 1000)  # the first weight (1200 values) is cut to 1000
    assert [t.numel() for t in tuner_module._sample(list(module.parameters()), 1000)] == [1000]
    assert [t.numel() for t in tuner_module._sample(list(module.parameters()), 1300)] == [1200, 30, 70]
    kappa = tuner_module.measure_conversions(list(module.parameters()), torch.float32, 2, 0)
    assert list(kappa) == tuner_module.CONVERT_KEYS
    assert all(math.isfinite(v) and v >= 0 for v in kappa.values()) and kappa["int8"] > 0
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


def test_the_first_syncs_one_time_costs_are_left_out_of_the_first_check():
    """A first decision at step 30 (H = 8, τ = 2): the first sync starts at 38 and merges at 40, its steps 1 s slower
    (first-use costs); checks count from 40, so the first falls at 40 + 16 = 56 and sees only the later syncs."""
    from types import SimpleNamespace

    from lightning_localsgd.tuning.tuner import _Watch

    meas = Measurements(0.1, 1e-3, 125e6, 0.1, {"full": 1e-10, "bfloat16": 2e-10, "int8": 1e-9, "int4": 2e-9}, 1000, 2)
    first = decide(meas, AutoTune(), comm_dtype=None, sync_every=8, overlap_steps=2, fragments=1)
    algorithm = SimpleNamespace(
        interruptions=0, in_flight=False, num_syncs=0, schedule_start=30, sync_every=8, overlap_steps=2, fragments=1,
        auto={"sync_every", "overlap_steps"}, overlappable=True,
        tuning_record={"measurements": meas.as_dict(), "decision": first.as_dict(), "history": []},
    )  # fmt: skip
    tuner = AutoTuner(AutoTune(retune_threshold=0.5))  # a check that re-tunes nothing: its entry is what we read
    tuner._algorithm = algorithm  # type: ignore[assignment]
    tuner._agree = lambda values: values  # type: ignore[method-assign]
    assert tuner._after_first_sync(30) == 40 and tuner._after_first_sync(37) == 40 and tuner._after_first_sync(38) == 48
    tuner._check, tuner._origin = _Watch(interruptions=0), tuner._after_first_sync(30)
    now = 0.0
    for step in range(31, 57):
        now += 0.1 + (1.0 if step in (39, 40) else 0.0)  # the first sync's steps
        tuner._watch(step, now)
    (entry,) = algorithm.tuning_record["history"]
    assert entry["step"] == 56 and entry["measured"] == pytest.approx(0.0, abs=1e-9)  # 16 steps of 0.1 s


@pytest.mark.parametrize(
    ("done_after", "expected"),
    [
        (1, 0.15 / 0.1 - 1),  # the probe ended inside the first step after W/2 (shorter than a step): that step
        (3, (0.15 + 0.13 + 0.11) / (3 * 0.1) - 1),  # it ran through steps 1-3 after W/2, ended in the third
        (99, (0.15 + 0.13 + 0.11 + 0.1) / (4 * 0.1) - 1),  # still running at W: all of them
    ],
)
def test_the_loaded_probe_measures_the_slowdown_of_the_steps_it_ran_in(done_after, expected):
    """W = 8: steps 1-4 at 0.1 s give t, the probe starts at the end of step 4; steps 5-8 take 0.15, 0.13, 0.11,
    0.1 s. s is the time of the steps the probe ran in over t: a probe that ends inside step 5 (a fast link, a
    replica's slice) still measures step 5, where before it left s at 0."""

    class Probe:
        steps = 0

        def done(self) -> bool:
            return self.steps >= done_after

    tuner = AutoTuner(AutoTune(measure_steps=8))
    probe = Probe()
    tuner._start = 0

    def first_measurements() -> None:
        tuner._first = {"step_seconds": 0.1, "probe_started": 0.4}
        tuner._transfer = probe  # type: ignore[assignment]

    tuner._first_measurements = first_measurements  # type: ignore[method-assign]
    seen: list[tuple[int, float] | None] = []
    tuner._decide = lambda step: seen.append(tuner._busy)  # type: ignore[method-assign]
    tuner._now = lambda synchronize=False: now  # type: ignore[method-assign]
    now = 0.0
    for step, seconds in enumerate([0.1, 0.1, 0.1, 0.1, 0.15, 0.13, 0.11, 0.1], start=1):
        now += seconds
        if step > 4:
            probe.steps += 1  # the probe's progress during this step, seen at its end
        tuner._measure(step, now)
    ((busy_steps, busy_seconds),) = seen
    assert busy_seconds / (busy_steps * 0.1) - 1 == pytest.approx(expected)
