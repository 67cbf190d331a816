"""Sharded replicas: ``LocalSGDStrategy(within_node="fsdp")``, FSDP2 inside each node, the consensus across nodes.

References, each independent of the code under test:

* one node against Lightning's own FSDP2 training (``ModelParallelStrategy``), step for step, with the
  user's ``configure_model`` and with the strategy's shard policy;
* 2 nodes × 2 ranks against ``within_node="ddp"`` (DDP inside, whole replicas on every rank) and
  against the plain-torch replay of tests/test_replica_groups.py;
* the values each rank holds against the closed form 1/k of the model;
* an exact resume against the straight run, and the checkpoint's consensus against the nodes' average.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from lightning_localsgd import LocalSGDStrategy
from lightning_localsgd.transport.collectives import Group
from lightning_localsgd.transport.replicas import replica_group
from tests.launch import run_ranks
from tests.test_replica_groups import N_PARAMS, _replay_periodic

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------------------------------------- bad input
def test_fsdp_arguments_are_checked_at_construction():
    kwargs = {"reshard_after_forward": False}
    strategy = LocalSGDStrategy(within_node="fsdp", fsdp_kwargs=kwargs, fsdp_modules=["Block"])
    assert strategy.within_node == "fsdp" and strategy._fsdp_modules == ["Block"]
    with pytest.raises(TypeError, match="fsdp_kwargs and fsdp_modules need within_node='fsdp'"):
        LocalSGDStrategy(within_node="ddp", fsdp_modules=["Block"])
    with pytest.raises(TypeError, match=r"fsdp_kwargs holds \['mesh'\]; it takes fully_shard's"):
        LocalSGDStrategy(within_node="fsdp", fsdp_kwargs={"mesh": None})
    with pytest.raises(TypeError, match="fsdp_modules must be a list of module classes or class names"):
        LocalSGDStrategy(within_node="fsdp", fsdp_modules="Block")
    with pytest.raises(ValueError, match="save_replicas=False would lose them"):
        LocalSGDStrategy(within_node="fsdp", save_replicas=False)
    from lightning_localsgd.fabric import LocalSGDStrategy as FabricStrategy

    with pytest.raises(ValueError, match="available with the Trainer's LocalSGDStrategy only"):
        FabricStrategy(within_node="fsdp")
    from lightning_localsgd.transport.sharding import apply_shard_policy
    from tests.models import TinyNet

    with pytest.raises(ValueError, match=r"fsdp_modules=\['Block'\] matches no module of the model; its classes are"):
        apply_shard_policy(TinyNet(), None, ["Block"], {})  # before any sharding: nothing half-done
    with pytest.raises(ValueError, match="5 processes do not divide into 2 nodes"):
        replica_group(5, 2, 0, Group(None, [0, 1], 0), timedelta(seconds=1))  # sharded replicas' groups too


def test_modules_the_strategy_cannot_shard_or_sync_are_refused_at_setup():
    """HSDP over the whole mesh, a DDP wrapper, a partly sharded model."""
    out = run_ranks("tests.scenarios_fsdp:refusals", world=2, nodes=1)
    for r in out:
        assert "shards inside each node only: pass mesh=self.device_mesh['shard']" in r["hsdp"]
        assert "wrapped in DistributedDataParallel" in r["ddp"] and "drop the wrapper" in r["ddp"]
        assert "sharded some parameters but not ['net.2.weight', 'net.2.bias']" in r["partial"]


# ---------------------------------------------------------------------------------------------- one node
def test_one_node_is_lightning_fsdp2_step_for_step():
    """ModelParallelStrategy (FSDP2 over the data-parallel dimension) against within_node='fsdp' with the
    same configure_model, and with the strategy's own shard policy: the same parameters after every step."""
    out = run_ranks("tests.scenarios_fsdp:model_parallel_equivalence", world=2, nodes=1, steps=6)
    for r in out:
        assert r["model_parallel"].shape == (6, N_PARAMS)
        assert (r["model_parallel"] - r["user"]).abs().max() <= 1e-12
        assert (r["model_parallel"] - r["policy"]).abs().max() <= 1e-12
        assert r["user_types"] == r["policy_types"] == ["DTensor"]  # sharded, not whole
        assert r["policy_bytes"].get("sync", 0.0) == 0.0  # one replica: nothing crosses nodes
        # a parameter registered on the LightningModule: the policy makes the module the root, as the user would
        assert (r["model_parallel_own"] - r["policy_own"]).abs().max() <= 1e-12
        assert r["policy_own_types"] == ["DTensor"]


# ---------------------------------------------------------------------------------------------- two nodes
def test_two_nodes_of_sharded_replicas_equal_ddp_inside_and_the_plain_torch_replay():
    steps, h = 12, 4
    diloco = {"sync_every": 4, "outer_lr": 0.7, "outer_momentum": 0.5}
    variants = {
        "periodic": ("periodic", {"sync_every": h}),
        "diloco": ("diloco", diloco),
        "diloco_overlap": ("diloco", {**diloco, "overlap_steps": 2}),
        "diloco_streaming": ("diloco", {**diloco, "overlap_steps": 1, "fragments": 2}),
        "diloco_offload": ("diloco", {**diloco, "overlap_steps": 2, "offload": True}),  # shard state in host memory
        "modified_localgd": ("modified_localgd", {"sync_every": h, "prox": 0.3}),
        "easgd": ("easgd", {"sync_every": h, "beta": 0.5}),
    }
    runs = []
    for within in ("ddp", "fsdp"):
        for name, (algorithm, kwargs) in variants.items():
            run = {"name": f"{within}_{name}", "within": within, "algorithm": algorithm, "kwargs": kwargs}
            runs.append({**run, "monitors": name == "periodic"})
        runs.append(
            {
                "name": f"{within}_validate",
                "within": within,
                "algorithm": "periodic",
                "kwargs": {"sync_every": h},
                "steps": 8,
                "val_every": 3,
            }
        )
    int8 = {"comm_dtype": "int8"}
    runs.append({"name": "fsdp_int8", "within": "fsdp", "algorithm": "diloco", "kwargs": diloco, "strategy": int8})
    runs = [{"steps": steps, **run} for run in runs]
    ranks = run_ranks("tests.scenarios_groups:fit_groups", world=4, nodes=2, runs=runs)

    for name in [*variants, "validate"]:
        for r in ranks:
            assert r[f"fsdp_{name}"]["wrapped"] == "TinyNet" and r[f"fsdp_{name}"]["replicas"] == 2
            gap = (r[f"fsdp_{name}"]["after"] - r[f"ddp_{name}"]["after"]).abs().max()
            assert gap <= 1e-10, (name, r["rank"], float(gap))
    # every model-sized tensor the algorithm holds is this rank's shard: FSDP2's dim-0 chunks of TinyNet(5, 8)
    # give rank 0 4×5 + 4 + 1×8 + 1 = 33 of the 57 values and rank 1 the other 24 (the 1-row layer is rank 0's)
    for r in ranks:
        mine = 33 if r["rank"] % 2 == 0 else N_PARAMS - 33
        assert r["fsdp_diloco_overlap"]["shard_numel"] == mine and r["ddp_diloco_overlap"]["shard_numel"] == N_PARAMS
        for name, keys in (("diloco_overlap", ("anchor", "outer", "inflight_sent")), ("int8", ("anchor", "residual"))):
            for key in keys:
                assert r[f"fsdp_{name}"]["held"][key] == mine, (name, key, r[f"fsdp_{name}"]["held"])
        assert r["ddp_diloco_overlap"]["held"]["anchor"] == N_PARAMS  # a whole replica: the whole model
    # ReplicaDrift: one distance per node, the whole replica's (the shards' squares summed inside the node)
    for r in ranks:
        fsdp, ddp = r["fsdp_periodic"]["drifts"], r["ddp_periodic"]["drifts"]
        assert len(fsdp) == steps and sum(bool(d) for d in fsdp) == steps - h + 1  # from the first sync on
        for a, b in zip(fsdp, ddp, strict=True):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-9 for k in a), (a, b)
    # the plain-torch replay: each node one SGD step on its whole batch, the nodes averaged every 4th step
    history = _replay_periodic(ranks[0]["fsdp_periodic"]["initial"], steps, h)
    for r in ranks:
        for t in range(steps):
            assert (r["fsdp_periodic"]["after"][t] - history[t][r["rank"] // 2]).abs().max() <= 1e-12
    # validation mid-round sees the two nodes' average (gathered whole from the shards)
    for r in ranks:
        for i, step in enumerate((3, 6)):
            mean = (ranks[0]["fsdp_validate"]["after"][step - 1] + ranks[2]["fsdp_validate"]["after"][step - 1]) / 2
            assert (r["fsdp_validate"]["val_params"][i] - mean).abs().max() <= 1e-12
        assert torch.equal(r["fsdp_validate"]["after"], r["fsdp_periodic"]["after"][:8])  # training untouched
    # int8 on shards: the same replica on every rank of a node and on both nodes after the final sync,
    # close to the fp64 consensus
    assert all(torch.equal(r["fsdp_int8"]["final"], ranks[0]["fsdp_int8"]["final"]) for r in ranks)
    assert (ranks[0]["fsdp_int8"]["final"] - ranks[0]["fsdp_diloco"]["final"]).abs().max() < 0.05
    # bytes: each rank sends its own shard across nodes (no node all-gather after the sync), plus the
    # replica's 4-byte NaN/Inf verdict inside the node; the two shards of a node make one model per sync
    per_node = ranks[0]["fsdp_periodic"]["bytes"]["sync"] + ranks[1]["fsdp_periodic"]["bytes"]["sync"]
    assert per_node == 3 * (N_PARAMS + 4) * 8.0  # 3 syncs; 2 NaN/Inf flags per rank
    assert per_node == ranks[0]["ddp_periodic"]["bytes"]["sync"] + ranks[1]["ddp_periodic"]["bytes"]["sync"]
    assert ranks[0]["fsdp_periodic"]["bytes"]["sync/node"] == 3 * 4.0
    assert ranks[0]["ddp_periodic"]["bytes"]["sync/node"] > 3 * 4.0  # DDP inside all-gathers the slices


def test_sharded_replicas_resume_exactly_mid_round_and_export_the_whole_consensus(tmp_path):
    """A checkpoint at step 6 (H = 4, overlap 1: mid-round, a sync in flight) resumed by a new Trainer
    continues bit for bit; the file holds the whole consensus model (the nodes' average), not a shard."""
    diloco = {"sync_every": 4, "outer_momentum": 0.5, "overlap_steps": 1}
    run = {"within": "fsdp", "algorithm": "diloco", "kwargs": diloco}
    runs = [{**run, "name": "run", "steps": 12, "epoch": 6, "resume_at": 6, "checkpoint_dir": str(tmp_path)}]
    ranks = run_ranks("tests.scenarios_groups:fit_groups", world=4, nodes=2, runs=runs)
    for r in ranks:
        assert torch.equal(r["run"]["resumed"], r["run"]["after"][6:]), r["rank"]
    saved = torch.load(tmp_path / "epoch=0-step=6.ckpt", map_location="cpu", weights_only=False)
    whole = torch.cat([v.reshape(-1) for v in saved["state_dict"].values()])
    assert whole.shape == (N_PARAMS,)
    mean = (ranks[0]["run"]["after"][5] + ranks[2]["run"]["after"][5]) / 2
    assert (whole - mean).abs().max() <= 1e-12
    # another world size: refused with the way out (the consensus file), before training starts
    other = [{**run, "name": "run", "steps": 12, "epoch": 6, "resume_from": str(tmp_path / "epoch=0-step=6.ckpt")}]
    with pytest.raises(RuntimeError, match="resumes on the same world size and nodes only"):
        run_ranks("tests.scenarios_groups:fit_groups", world=2, nodes=1, runs=other)


def test_validate_after_fit_and_a_checkpoint_loaded_into_a_sharded_model_see_the_consensus():
    """After fit (ended mid-round: the last sync is fit's own) every rank holds the consensus; trainer.validate
    on the sharded model and a fresh model sharded in configure_model loading the checkpoint file both see it."""
    out = run_ranks("tests.scenarios_fsdp:validate_after_fit", world=4, nodes=2)
    for r in out:
        assert torch.equal(r["final"], out[0]["final"])  # every rank, both nodes
        assert torch.equal(r["validated"], r["final"]) and torch.equal(r["after"], r["final"])
        assert torch.equal(r["loaded"], r["final"])
