"""Replica groups: ``LocalSGDStrategy(within_node="ddp")``, DDP inside each node, the consensus across nodes.

References, each independent of the code under test:

* the split cross-node mean against a whole-buffer mean over the same ranks and a plain-torch mean;
* one node against Lightning's own ``DDPStrategy``, step for step;
* 2 nodes × 2 ranks against a plain-torch replay (gradients averaged inside each node, the nodes
  averaged every H steps), and against per-process local SGD on 2 ranks with each node's whole
  batch (DiLoCo blocking, overlapped, streamed);
* bytes against their closed forms.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_localsgd import DiLoCo, GradAlign, LeaderSGD, LocalSGDStrategy, PeriodicAveraging, TorchFT
from lightning_localsgd.contract import FrontEnd
from lightning_localsgd.transport.collectives import Group
from lightning_localsgd.transport.replicas import replica_group
from tests.launch import run_ranks
from tests.models import TinyNet
from tests.scenarios_groups import node_batch

pytestmark = pytest.mark.timeout(600)
N_PARAMS = 5 * 8 + 8 + 8 + 1  # TinyNet(5, 8): Linear(5, 8) + Linear(8, 1)


# ---------------------------------------------------------------------------------------------- bad input
def test_within_node_values_and_ddp_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match="within_node must be None .*, 'ddp' .* or 'fsdp'"):
        LocalSGDStrategy(within_node="node")
    with pytest.raises(TypeError, match="ddp_kwargs=.* needs within_node='ddp'"):
        LocalSGDStrategy(ddp_kwargs={"find_unused_parameters": True})
    with pytest.raises(TypeError, match="ddp_kwargs=.* needs within_node='ddp'"):
        LocalSGDStrategy(within_node="fsdp", ddp_kwargs={"find_unused_parameters": True})
    with pytest.raises(TypeError, match=r"ddp_kwargs holds \['bucket_size'\], which DistributedDataParallel does not"):
        LocalSGDStrategy(within_node="ddp", ddp_kwargs={"bucket_size": 25})
    with pytest.raises(TypeError, match=r"ddp_kwargs holds \['process_group'\].*the strategy sets"):
        LocalSGDStrategy(within_node="ddp", ddp_kwargs={"process_group": None})
    ft = TorchFT(lighthouse_addr="http://127.0.0.1:29510", replica_id=0)
    with pytest.raises(ValueError, match="fault_tolerance with within_node='fsdp' is not supported yet"):
        LocalSGDStrategy(within_node="fsdp", fault_tolerance=ft)
    assert LocalSGDStrategy(within_node="ddp", fault_tolerance=ft).within_node == "ddp"  # a group = a DDP node
    strategy = LocalSGDStrategy(within_node="ddp", ddp_kwargs={"find_unused_parameters": True, "bucket_cap_mb": 4})
    assert strategy.within_node == "ddp"
    assert strategy._ddp_kwargs == {"find_unused_parameters": True, "bucket_cap_mb": 4}
    assert LocalSGDStrategy().within_node is None


class _GroupsFrontEnd(FrontEnd):
    comm = None  # type: ignore[assignment]
    algorithm = None
    loss_scaling = False

    def __init__(self, within_node: str) -> None:
        self._within = within_node

    @property
    def within_node(self) -> str | None:
        return self._within


@pytest.mark.parametrize("within_node", ["ddp", "fsdp"])
@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (LeaderSGD(4), "LeaderSGD elects the process with the lowest training loss.*within_node=None"),
        (GradAlign(0.1), "GradAlign aligns each process's own gradient.*share one gradient \\(DDP's or FSDP's\\)"),
        (PeriodicAveraging(4, node_sync_every=2), "drop node_sync_every"),
    ],
)
def test_algorithms_that_cannot_use_replica_groups_refuse_at_setup(callback, message, within_node):
    """Replica groups (DDP inside) and sharded replicas (FSDP2 inside) alike."""
    with pytest.raises(ValueError, match=message):
        callback.check_front_end(_GroupsFrontEnd(within_node))
    PeriodicAveraging(4).check_front_end(_GroupsFrontEnd(within_node))  # the others accept
    DiLoCo(4, overlap_steps=2, fragments=2).check_front_end(_GroupsFrontEnd(within_node))


def test_sync_batchnorm_synchronizes_inside_the_node_only_and_is_refused_per_process():
    """SyncBatchNorm needs GPU modules under DDP, so this checks the conversion (process group of the node)."""
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from lightning_localsgd.trainer.strategy import NodeSyncBatchNorm

    strategy = LocalSGDStrategy(within_node="ddp")
    strategy._layer_sync = TorchSyncBatchNorm()
    node_handle = object()
    strategy._node_group = Group(node_handle, [0, 1], 0)
    strategy._check_layer_sync()
    assert isinstance(strategy._layer_sync, NodeSyncBatchNorm)
    converted = strategy._layer_sync.apply(TinyNet(batchnorm=True))
    sync = [m for m in converted.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(sync) == 1 and sync[0].process_group is node_handle
    per_process = LocalSGDStrategy()
    per_process._layer_sync = TorchSyncBatchNorm()
    with pytest.raises(ValueError, match="sync_batchnorm=True would allreduce batch statistics over every process"):
        per_process._check_layer_sync()


def test_a_node_size_that_does_not_divide_the_world_is_refused():
    with pytest.raises(ValueError, match="5 processes do not divide into 2 nodes"):
        replica_group(5, 2, 0, Group(None, [0, 1], 0), timedelta(seconds=1))


# ---------------------------------------------------------------------------------------------- the transport
def test_split_cross_node_mean_equals_a_whole_buffer_mean_and_its_closed_form_bytes():
    n = 1000
    ranks = run_ranks("tests.scenarios_groups:split_means", world=4, nodes=2, n=n, nan_slice=1)
    xs = {r["node"]: r["x"] for r in ranks}
    exact = (xs[0] + xs[1]) / 2
    chunk = n // 2  # ceil(1000 / 2): each of a node's 2 ranks reduces half the model across nodes
    for r in ranks:
        fp64 = r["fp64"]
        assert torch.equal(fp64["split"]["mean"], fp64["whole"]["mean"])  # the same sums, slice by slice
        assert torch.allclose(fp64["split"]["mean"], exact, rtol=0, atol=1e-15)
        # closed form: an allreduce of the slice (+2 NaN flags) over 2 nodes sends 2·(2−1)/2·(c+2)·8 bytes;
        # the node's all-gather (2−1)·c·8; the whole-buffer mean sends the whole model from every rank
        assert fp64["split"]["bytes"] == {"sync": (chunk + 2) * 8.0, "sync/node": chunk * 8.0}
        assert fp64["whole"]["bytes"] == {"sync": (n + 2) * 8.0}
        bf16 = r["bf16"]
        assert torch.equal(bf16["split"]["mean"], bf16["whole"]["mean"])  # deltas from the anchor, bf16 on the wire
        assert (bf16["split"]["mean"] - exact).abs().max() < 2e-2
        assert bf16["split"]["bytes"]["sync"] == (chunk + 2) * 2.0
        # int8: per-block rounding of the slice; what rounding dropped is in the residuals (error feedback)
        int8 = r["int8"]
        assert (int8["split"]["mean"] - exact).abs().max() < 0.05
        assert torch.equal(r["background"], fp64["split"]["mean"])
    # every rank of the world ends with the same bytes (the all-gather hands out the same slices)
    for label in ("fp64", "bf16", "int8"):
        assert all(torch.equal(r[label]["split"]["mean"], ranks[0][label]["split"]["mean"]) for r in ranks)
    # error feedback, split: the mean plus the average of the residuals is the exact mean
    # (each slice's residual lives on the rank that owns the slice; the other slice's stays zero)
    total_residual = sum(r["int8"]["split"]["residual"] for r in ranks) / 2  # 2 nodes
    recovered = ranks[0]["int8"]["split"]["mean"] + total_residual
    assert torch.allclose(recovered, exact, atol=1e-6)
    for r in ranks:
        own = slice(0, chunk) if r["rank"] % 2 == 0 else slice(chunk, n)
        other = slice(chunk, n) if r["rank"] % 2 == 0 else slice(0, chunk)
        assert r["int8"]["split"]["residual"][other].abs().max() == 0
        assert r["int8"]["split"]["residual"][own].abs().max() > 0
    # NaN in slice 1 of node 1 only: both slices skip node 1 (one verdict per replica), or every rank raises
    for r in ranks:
        assert torch.equal(r["nonfinite"]["skip"], xs[0])
        assert "holds NaN/Inf" in r["nonfinite"]["raise"]


# ---------------------------------------------------------------------------------------------- the strategy
def test_one_node_of_replica_groups_is_lightning_ddp_step_for_step():
    out = run_ranks("tests.scenarios_core:ddp_equivalence", world=2, nodes=1, steps=6, localsgd={"within_node": "ddp"})
    for r in out:
        assert (r["ddp"] - r["localsgd"]).abs().max() <= 1e-12
        assert r["bytes"].get("sync", 0.0) == 0.0  # one replica: nothing to sync


def _replay_periodic(initial: torch.Tensor, steps: int, h: int, lr: float = 0.1) -> list[list[torch.Tensor]]:
    """Plain torch: each node steps SGD on its whole batch (DDP's average of its ranks' halves), the
    two nodes' parameters are averaged after every H-th step. Returns each node's parameters after each step."""
    net = TinyNet()
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def unflat(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            out[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return out

    theta = [initial.clone(), initial.clone()]
    history = []
    for t in range(steps):
        for v in range(2):
            x, y = node_batch(v, t)
            w = theta[v].clone().requires_grad_(True)
            pred = torch.func.functional_call(net, unflat(w), (x,))
            loss = nn.functional.mse_loss(pred, y)
            (grad,) = torch.autograd.grad(loss, w)
            theta[v] = (theta[v] - lr * grad).detach()
        if (t + 1) % h == 0:
            mean = (theta[0] + theta[1]) / 2
            theta = [mean.clone(), mean.clone()]
        history.append([theta[0].clone(), theta[1].clone()])
    return history


def test_two_nodes_of_two_ranks_follow_a_plain_torch_replay_and_per_process_local_sgd():
    steps, h = 12, 4
    diloco = {"sync_every": 4, "outer_lr": 0.7, "outer_momentum": 0.5}
    variants = {
        "diloco": diloco,
        "diloco_overlap": {**diloco, "overlap_steps": 2},
        "diloco_streaming": {**diloco, "overlap_steps": 1, "fragments": 2},
    }
    runs = [
        {"name": "periodic", "algorithm": "periodic", "kwargs": {"sync_every": h}, "steps": steps, "monitors": True},
        {
            "name": "periodic_warmup",
            "algorithm": "periodic",
            "kwargs": {"sync_every": h, "warmup_steps": 2},
            "steps": 8,
        },
        *({"name": k, "algorithm": "diloco", "kwargs": v, "steps": steps} for k, v in variants.items()),
        {
            "name": "modified_localgd",
            "algorithm": "modified_localgd",
            "kwargs": {"sync_every": h, "prox": 0.3},
            "steps": 8,
        },
        {
            "name": "easgd",
            "algorithm": "easgd",
            "kwargs": {"sync_every": h, "beta": 0.5},
            "steps": 8,
        },  # α = β / 2 nodes
        {"name": "validate", "algorithm": "periodic", "kwargs": {"sync_every": h}, "steps": 8, "val_every": 3},
        {
            "name": "diloco_int8",
            "algorithm": "diloco",
            "kwargs": diloco,
            "steps": steps,
            "strategy": {"comm_dtype": "int8"},
        },
    ]
    groups = run_ranks("tests.scenarios_groups:fit_groups", world=4, nodes=2, runs=runs)
    fabric_runs = [run for run in runs if run["name"] in ("periodic", "diloco_overlap")]
    fabric = run_ranks("tests.scenarios_groups:fabric_groups", world=4, nodes=2, runs=fabric_runs)
    reference_runs = [
        {**run, "groups": False, "monitors": False} for run in runs if run["name"] not in ("diloco_int8", "validate")
    ]
    reference = run_ranks("tests.scenarios_groups:fit_groups", world=2, nodes=2, runs=reference_runs)

    # the module is DDP-wrapped over each node, and the algorithm sees 2 replicas
    assert all(r["periodic"]["wrapped"] == "DistributedDataParallel" for r in groups)
    assert all(r["periodic"]["replicas"] == 2 for r in groups)
    # the two ranks of a node hold the same replica after every step, bit for bit
    for name in [run["name"] for run in runs]:
        for v in range(2):
            assert torch.equal(groups[2 * v][name]["after"], groups[2 * v + 1][name]["after"]), (name, v)

    # PeriodicAveraging against the plain-torch replay
    history = _replay_periodic(groups[0]["periodic"]["initial"], steps, h)
    for r in groups:
        v = r["rank"] // 2
        for t in range(steps):
            assert (r["periodic"]["after"][t] - history[t][v]).abs().max() <= 1e-12, (r["rank"], t)
    # hand-checkable: after step 4 both nodes hold the same parameters, after step 5 they differ
    assert torch.equal(groups[0]["periodic"]["after"][3], groups[2]["periodic"]["after"][3])
    assert not torch.equal(groups[0]["periodic"]["after"][4], groups[2]["periodic"]["after"][4])

    # every algorithm against per-process local SGD with each node's whole batch (2 ranks)
    for run in reference_runs:
        name = run["name"]
        for r in groups:
            ref = reference[r["rank"] // 2][name]["after"]
            assert (r[name]["after"] - ref).abs().max() <= 1e-10, (name, r["rank"])

    # validation at steps 3 and 6 (mid-round) sees the average of the two nodes, and training goes on untouched
    for r in groups:
        assert torch.equal(r["validate"]["after"], r["periodic"]["after"][:8])
        assert len(r["validate"]["val_params"]) == 2
        for i, step in enumerate((3, 6)):
            mean = (groups[0]["validate"]["after"][step - 1] + groups[2]["validate"]["after"][step - 1]) / 2
            assert (r["validate"]["val_params"][i] - mean).abs().max() <= 1e-12, (r["rank"], step)

    # Fabric's front end, the same runs written as a Fabric loop
    for r, f in zip(groups, fabric, strict=True):
        for run in fabric_runs:
            assert f[run["name"]]["wrapped"] == "DistributedDataParallel"
            assert (f[run["name"]]["after"] - r[run["name"]]["after"]).abs().max() <= 1e-12, (run["name"], r["rank"])

    # int8 across nodes: equal inside each node (above), the consensus close to the fp64 one
    assert (groups[0]["diloco_int8"]["final"] - groups[0]["diloco"]["final"]).abs().max() < 0.05
    assert torch.equal(groups[0]["diloco_int8"]["final"], groups[3]["diloco_int8"]["final"])

    # bytes: each rank reduces half the model with its peer on the other node, 3 syncs in 12 steps
    half = -(-N_PARAMS // 2)
    for r in groups:
        mine = half if r["rank"] % 2 == 0 else N_PARAMS - half
        assert r["periodic"]["bytes"]["sync"] == 3 * (mine + 2) * 8.0, r["periodic"]["bytes"]
        assert r["periodic"]["bytes"]["sync/node"] == 3 * half * 8.0
        # DDP's own gradient allreduce inside the node, booked by the strategy's comm hook: 2·(k−1)/k·B per step
        assert r["periodic"]["bytes"]["grad/node"] == steps * N_PARAMS * 8.0
        # ReplicaDrift: one distance per node, computed over that rank's slice of the pre-sync replica
        assert len(r["periodic"]["drifts"]) == steps
    # cross-node bytes per node per sync = one model (its two ranks' halves) + 2 flags each
    per_node = groups[0]["periodic"]["bytes"]["sync"] + groups[1]["periodic"]["bytes"]["sync"]
    assert per_node == 3 * (N_PARAMS + 4) * 8.0


def test_replica_groups_resume_exactly_mid_round_and_on_another_world_size(tmp_path):
    """A checkpoint at step 6 (H = 4: mid-round) resumed by a new Trainer continues bit for bit on 2 nodes × 2;
    on 2 nodes × 1 every rank starts from the consensus (the two nodes' average)."""
    run = {"algorithm": "diloco", "kwargs": {"sync_every": 4, "outer_momentum": 0.5, "overlap_steps": 1}}
    runs = [{**run, "name": "run", "steps": 12, "epoch": 6, "resume_at": 6, "checkpoint_dir": str(tmp_path)}]
    ranks = run_ranks("tests.scenarios_groups:fit_groups", world=4, nodes=2, runs=runs)
    for r in ranks:
        straight, resumed = r["run"]["after"], r["run"]["resumed"]
        assert resumed.shape == (6, N_PARAMS)
        assert torch.equal(resumed, straight[6:]), r["rank"]
    smaller = [{**run, "name": "run", "steps": 12, "epoch": 6, "resume_from": str(tmp_path / "epoch=0-step=6.ckpt")}]
    two = run_ranks("tests.scenarios_groups:fit_groups", world=2, nodes=2, runs=smaller)
    consensus = (ranks[0]["run"]["after"][5] + ranks[2]["run"]["after"][5]) / 2
    for r in two:
        assert (r["run"]["initial"] - consensus).abs().max() <= 1e-12
        assert r["run"]["after"].shape == (6, N_PARAMS)  # steps 7..12


def test_cross_node_bytes_on_two_simulated_nodes_match_the_counters_and_the_closed_form(tmp_path):
    """2 nodes × 2 in two network namespaces (recipes.launch.two_nodes): what the veth between the nodes
    carried equals what the counters booked as "sync" (one model per node per sync, the closed form), and
    the node's loopback what they booked as "sync/node"; TCP/IP headers add a few percent."""
    import json
    import sys

    from recipes.launch import LinkUnavailable, check_link_support, run_local_ranks

    try:
        check_link_support("two simulated nodes", "skip this test")
    except LinkUnavailable as err:
        pytest.skip(str(err))
    n, syncs = 1_000_000, 3  # 4 MB of fp32 per sync
    cmd = [sys.executable, "-m", "tests.scenarios_groups", str(tmp_path), str(n), str(syncs)]
    root = Path(__file__).resolve().parents[1]
    traffic = run_local_ranks(
        cmd, world=4, nodes=2, log_dir=tmp_path, timeout=120, cwd=root, pythonpath=root, node_namespaces=True
    )
    booked = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    closed_form = syncs * (n // 2 + 2) * 4.0  # per rank: an allreduce of half the model (+2 flags) over 2 nodes
    assert all(b["sync"] == closed_form for b in booked)
    assert all(b["sync/node"] == syncs * (n // 2) * 4.0 for b in booked)
    for node in range(2):
        cross = traffic["cross_node_tx_bytes"][node]
        intra = traffic["intra_node_tx_bytes"][node]
        per_node = booked[2 * node]["sync"] + booked[2 * node + 1]["sync"]  # = one model per sync
        assert per_node == syncs * (n + 4) * 4.0
        assert 1.0 <= cross / per_node < 1.08, (cross, per_node)
        node_gather = booked[2 * node]["sync/node"] + booked[2 * node + 1]["sync/node"]
        assert 1.0 <= intra / node_gather < 1.08, (intra, node_gather)


def test_the_auto_tuner_decides_once_for_replica_groups_and_measures_the_cross_node_slice():
    """Issue 24 with replica groups: the tuner measures on the cross-node group, counts this rank's slice of a sync,
    and every rank of both nodes applies the one decision (the ranks of a node stay equal, bit for bit)."""
    from lightning_localsgd import AutoTune

    tune = AutoTune(measure_steps=4, settle_steps=1, retune_every=0, sync_every=(2, 6), formats=(None, "bfloat16"))
    auto = {"sync_every": "auto", "overlap_steps": "auto", "fragments": "auto"}
    runs = [
        {
            "name": "auto",
            "algorithm": "periodic",
            "kwargs": auto,
            "steps": 16,
            "strategy": {"comm_dtype": "auto", "autotune": tune},
        }
    ]
    groups = run_ranks("tests.scenarios_groups:fit_groups", world=4, nodes=2, runs=runs)
    records = [r["auto"]["tuning"] for r in groups]
    assert all(record == records[0] for record in records)  # one decision, the same measurements everywhere
    record = records[0]
    assert record["step"] == 1 + 4  # after the settle step and the 4 measuring steps
    meas, decision = record["measurements"], record["decision"]
    assert meas["replicas"] == 2 and meas["numel"] == -(-N_PARAMS // 2)  # this rank's slice (the larger one)
    assert 2 <= decision["sync_every"] <= 6 and decision["comm_dtype"] in (None, "bfloat16")
    assert len({r["auto"]["comm_dtype"] for r in groups}) == 1
    for v in range(2):  # the two ranks of a node hold the same replica after every step
        assert torch.equal(groups[2 * v]["auto"]["after"], groups[2 * v + 1]["auto"]["after"])
    assert all(torch.equal(r["auto"]["final"], groups[0]["auto"]["final"]) for r in groups)  # fit ends on consensus
    assert not torch.equal(groups[0]["auto"]["after"][4], groups[2]["auto"]["after"][4])  # the nodes drifted apart
