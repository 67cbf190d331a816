"""The auto-tuner on 2 real gloo ranks: one decision for everyone, the tuned schedule against plain torch,
a resume that keeps the choice, explicit arguments kept, re-tuning (docs/autotune.md)."""

from __future__ import annotations

import pytest
import torch

from tests.launch import run_ranks
from tests.test_overlap_dist import reference

AUTO = dict(sync_every="auto", overlap_steps="auto", fragments="auto")


def test_every_rank_applies_rank_0s_decision_from_the_slowest_ranks_measurements():
    # Rank 0's decide returns (full precision, H = 4, τ = 1, P = 2), rank 1's another: rank 0's is broadcast.
    # Rank 1 measures 1000x the conversion costs: the measurements both ranks decide on are the slowest rank's.
    forced = [
        dict(comm_dtype=None, sync_every=4, overlap_steps=1, fragments=2),
        dict(comm_dtype="int8", sync_every=8, overlap_steps=0, fragments=1),
    ]
    w, settle, steps = 4, 2, 14
    start = settle + w  # the decision: after the unmeasured settle steps and the W measuring steps
    runs = run_ranks(
        "tests.scenarios_autotune:tuned",
        world=2,
        steps=steps,
        algorithm="periodic",
        kwargs=AUTO,
        autotune=dict(measure_steps=w, settle_steps=settle, retune_every=0),
        forced=forced,
        convert_scale=[1.0, 1000.0],
    )
    r0, r1 = runs
    for r in runs:
        assert r["schedule"][: start - 1] == [(1 << 30, 0, 1, None, True)] * (start - 1)  # local steps only
        assert r["schedule"][start - 1 :] == [(4, 1, 2, start, False)] * (steps - start + 1)
        assert r["comm_dtype"] is None
        assert r["record"]["decision"]["sync_every"] == 4
    assert r0["record"] == r1["record"]
    assert r0["decide_calls"][0]["measurements"] == r1["decide_calls"][0]["measurements"]
    agreed = r0["record"]["measurements"]["convert"]
    assert agreed == pytest.approx(r1["own_convert"]) and agreed["int8"] > 100 * r0["own_convert"]["int8"]
    assert r0["decide_calls"][0]["measurements"]["replicas"] == 2
    # the tuned run is the plain-torch replay of local steps until settle + W, then fragments from there on
    after, final = reference(steps, 4, 2, 1, None, origin=start)
    for r in range(2):
        assert (torch.stack(runs[r]["after"]) - torch.stack(after[r])).abs().max() <= 1e-12
        assert (runs[r]["final"] - final).abs().max() <= 1e-12
    assert r0["tune_calls"] > 0  # the tuner's own collectives are booked under "tune"


def test_a_resume_keeps_the_choice_and_an_explicit_argument_is_never_changed(tmp_path):
    # real measurements: DiLoCo with H = 6 given, τ and the wire format left to the tuner
    kwargs = dict(sync_every=6, overlap_steps="auto", outer_lr=0.5, outer_momentum=0.8, nesterov=False)
    common = dict(
        world=2,
        steps=20,
        algorithm="diloco",
        kwargs=kwargs,
        autotune=dict(measure_steps=4, settle_steps=0, retune_every=0),
    )
    common.update(folder=str(tmp_path), full_batch=True)
    first = run_ranks("tests.scenarios_autotune:tuned", save_at=12, **common)
    again = run_ranks("tests.scenarios_autotune:tuned", resume=True, **common)
    for a, b in zip(first, again, strict=True):
        assert {row[0] for row in a["schedule"][3:]} == {6}  # H stays the user's
        assert a["record"] == b["record"] and a["record"]["decision"]["sync_every"] == 6
        assert b["decide_calls"] == [] and b["tune_calls"] == 0  # resumed: no measuring, no new decision
        assert b["schedule"] == a["schedule"][12:]
        assert a["comm_dtype"] == b["comm_dtype"]
        assert (torch.stack(b["after"]) - torch.stack(a["after"][12:])).abs().max() == 0.0  # exact resume
    assert first[0]["record"] == first[1]["record"]
    assert torch.equal(first[0]["final"], first[1]["final"])


def test_retuning_checks_the_measured_overhead_and_every_rank_changes_together():
    runs = run_ranks(
        "tests.scenarios_autotune:tuned",
        world=2,
        steps=60,
        algorithm="periodic",
        kwargs=dict(sync_every="auto", overlap_steps="auto"),
        comm_dtype=None,
        autotune=dict(measure_steps=4, settle_steps=0, retune_every=6, retune_threshold=1e-9, sync_every=(2, 64)),
        # a first choice far too short (a sync every 2 ms-steps): the re-tuning must lengthen it, whatever the timing
        forced_first=dict(comm_dtype=None, sync_every=2, overlap_steps=0, fragments=1),
    )
    r0, r1 = runs
    assert r0["schedule"] == r1["schedule"] and r0["record"] == r1["record"]
    history = r0["record"]["history"]
    # the first check of a new setting after two rounds and at least 16 steps, counted from the first sync's merge
    # (its one-time costs left out): the decision at step 4, H = 2, τ = 0 → the first sync at 6 → step 22
    assert history[0]["step"] == 22
    changed = [h for h in history if "decision" in h]
    assert changed  # a threshold of 1e-9: a check off the target re-tunes while a longer H is allowed
    assert r0["record"]["too_short"] >= 2 and changed[0]["decision"]["sync_every"] > 2
    for h in changed:
        d = h["decision"]
        assert d["comm_dtype"] is None and d["fragments"] == 1 and 2 <= d["sync_every"] <= 64  # only H and τ move
    too_short = r0["record"].get("too_short", 0)
    if too_short < 64:  # an H measured too slow is never chosen again
        assert r0["record"]["decision"]["sync_every"] > too_short
    assert torch.equal(r0["final"], r1["final"])  # fit ends on the consensus


def test_fabric_tunes_like_the_trainer_and_resumes_with_the_choice():
    # the decision is fixed (full precision, H = 4, τ = 1, P = 2) so that the runs are comparable bit for bit
    runs = run_ranks("tests.scenarios_autotune:fabric_auto", world=2, steps=8, save_at=6)  # one epoch
    for run in runs:
        trainer, fabric = run["pair"]["trainer"], run["pair"]["fabric"]
        assert len(trainer) == len(fabric) == 8
        assert all(torch.equal(a, b) for a, b in zip(trainer, fabric, strict=True))
        whole, resumed = run["resume"]["whole"], run["resume"]["resumed"]
        assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))  # resumed after the decision
    assert not torch.equal(runs[0]["pair"]["fabric"][6], runs[1]["pair"]["fabric"][6])  # the replicas drift
