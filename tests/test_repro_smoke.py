"""The reproductions' bookkeeping against closed forms (benchmarks/gradalign_label_skew.py,
benchmarks/lsgd_vs_easgd.py).

One tiny run of the lsgd_vs_easgd benchmark's worker on 4 processes as 2 nodes × 2: the training bytes it
records from the library's counter for each variant must equal the closed form of that algorithm's
collectives, and the label-skew partition of gradalign_label_skew must hold the classes its docstring states.
"""

from __future__ import annotations

import pytest

pytest.importorskip("mlxtend")

from benchmarks.common import ddp_closed_form_bytes_per_step
from benchmarks.gradalign_label_skew import label_skew_shards
from benchmarks.lsgd_vs_easgd import DEFAULT_VARIANTS, mnist_split, summarize, variant_specs
from tests.launch import run_ranks

P = 16_938  # parameters of benchmarks.lsgd_vs_easgd.make_cnn


def test_cnn_size_and_ddp_closed_form():
    from benchmarks.lsgd_vs_easgd import make_cnn

    assert sum(p.numel() for p in make_cnn().parameters()) == P
    assert ddp_closed_form_bytes_per_step(P, 4) == 2 * 3 / 4 * 4 * P  # 101,628 bytes
    assert ddp_closed_form_bytes_per_step(P, 2) == 4 * P


def test_label_skew_shards_hold_the_stated_classes():
    _, ytr, _, yte = mnist_split(1000)
    assert len(ytr) == 4000 and len(yte) == 1000
    assert yte.bincount().tolist() == [100] * 10
    shards = label_skew_shards(ytr, 4)
    assert [len(s) for s in shards] == [1000] * 4
    assert [sorted(set(ytr[s].tolist())) for s in shards] == [[0, 1, 2], [2, 3, 4], [5, 6, 7], [7, 8, 9]]
    assert len(set().union(*[set(s.tolist()) for s in shards])) == 4000  # disjoint


def test_lsgd_vs_easgd_bytes_per_variant_equal_the_closed_forms():
    steps, world, nodes = 16, 4, 2
    names = ["periodic_t4", "easgd_t4", "lsgd_t4", "lsgd_ml_t16", "ddp"]
    specs = variant_specs([4, 16])
    assert set(DEFAULT_VARIANTS.split(",")) <= set(specs)
    cfg = {
        "steps": steps,
        "eval_every": steps,
        "repeats": 1,
        "batch_size": 8,
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        "pull": 0.1,
        "loss_window": 10,
        "easgd_beta": 0.9,
        "test_size": 1000,
        "target_error": 0.5,
        "warmup_steps": 0,
        "seed": 0,
        "collective_timeout": 120,
        "variants": names,
        "specs": {n: specs[n] for n in names},
        "schedule": [{"variant": n, "repeat": 0, "seed": 0} for n in names],
    }
    # the worker entry (python -m benchmarks.lsgd_vs_easgd --worker cfg.json) on shared rank processes
    ranks = run_ranks("tests.scenarios_bench:lsgd_vs_easgd_worker", world=world, nodes=nodes, timeout=280, cfg=cfg)
    f = 4  # fp32
    allreduce = 2 * (world - 1) / world * f * (P + world)  # the buffer carries one NaN flag per rank
    gather = (world - 1) * 2 * 8  # election: two float64 per rank
    node_gather = (2 - 1) * 2 * 8
    expected = {
        "periodic_t4": steps // 4 * allreduce,
        "easgd_t4": steps // 4 * allreduce,
        "lsgd_t4": steps // 4 * ((world - 1) / world * f * P + gather),
        # global pull at step 16; node pulls (2 ranks each) at 4, 8, 12
        "lsgd_ml_t16": (3 / 4 * f * P + gather) + 3 * (1 / 2 * f * P + node_gather),
    }
    for r in ranks:  # the counter's estimate does not depend on the rank (nor on a broadcast's root)
        recs = {rec["variant"]: rec for rec in r["records"]}
        for name, value in expected.items():
            last = recs[name]["points"][-1]
            assert last["step"] == steps
            assert last["train_bytes_counter"] == pytest.approx(value, rel=1e-12), (r["rank"], name)
        assert recs["lsgd_t4"]["num_syncs"] == steps // 4 + 1  # 4 pulls, then the final average
        assert recs["lsgd_ml_t16"]["num_node_syncs"] == 3
    result = {"config": dict(cfg, world=world, nodes=nodes), "ranks": [ranks[0]]}
    summary = summarize(result)["variants"]
    assert summary["ddp"]["train_bytes_per_step"] == pytest.approx(2 * 3 / 4 * f * P)
    assert summary["ddp"]["bytes_source"].startswith("closed form")
    for name, value in expected.items():
        assert summary[name]["train_bytes_per_step"] == pytest.approx(value / steps, rel=1e-12)
