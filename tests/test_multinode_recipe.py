"""The recipe as 2 nodes × 1 process: two ``torchrun --nnodes=2`` launches on 127.0.0.1.

Each launch runs ``python -m recipes.cli fit --config base.yaml --config localsgd.yaml`` exactly
as a user would on two machines (Lightning picks up torchrun's ``TorchElasticEnvironment``).
Checked: both nodes end with bitwise-identical parameters although their replicas differed
one step before the last sync (each node trained on its own shard), and the library's byte
counter equals the closed form for the setup broadcast and the syncs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from recipes.launch import free_port
from tests.launch import ROOT

TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 16  # the localsgd overlay syncs every 8 steps: syncs at 8 and 16
MODEL = "test_resnet"  # timm's 0.37M-parameter ResNet: the recipe's code path at a test's cost


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class DumpFinalState(Callback):
    """Save this rank's parameters (start, one step before the end, end) and the library's counters."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.state: dict[str, Any] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.state["start"] = flat(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == STEPS - 1:
            self.state["before_last_sync"] = flat(pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counters = trainer.strategy.comm.counters
        self.state.update(
            end=flat(pl_module),
            bytes=dict(counters.bytes_by_purpose),
            syncs=trainer.strategy.algorithm.num_syncs,
            step=trainer.global_step,
            world=trainer.world_size,
            node_rank=trainer.node_rank,
            env=type(trainer.strategy.cluster_environment).__name__,
            shard=trainer.datamodule.shard.tolist(),
        )
        torch.save(self.state, self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_nodes_by_torchrun_reach_consensus_and_count_bytes(tmp_path):
    configs = ROOT / "configs" / "image_classification"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    with contextlib.ExitStack() as logs:  # every node's log file, closed after the nodes ended
        for node in range(2):
            cmd = [
                str(TORCHRUN),
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "recipes.cli",
                "fit",
                "--config",
                str(configs / "base.yaml"),
                "--config",
                str(configs / "localsgd.yaml"),
                "--trainer.accelerator=cpu",
                "--trainer.num_nodes=2",
                "--trainer.devices=1",
                f"--trainer.max_steps={STEPS}",
                "--trainer.limit_val_batches=0",
                "--trainer.logger=false",
                "--trainer.enable_checkpointing=false",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                f"--trainer.default_root_dir={tmp_path}",
                f"--model.model_name={MODEL}",
                "--data.image_size=16",
                "--trainer.callbacks+=tests.test_multinode_recipe.DumpFinalState",
                f"--trainer.callbacks.out_dir={tmp_path}",
            ]
            log = logs.enter_context(open(tmp_path / f"node{node}.log", "w"))
            procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=150) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    tails = "\n".join(f"--- node {i} ---\n" + (tmp_path / f"node{i}.log").read_text()[-4000:] for i in range(2))
    assert codes == [0, 0], tails

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert (r0["env"], r0["world"], r0["node_rank"], r1["node_rank"]) == ("TorchElasticEnvironment", 2, 0, 1)
    assert r0["step"] == r1["step"] == STEPS and r0["syncs"] == r1["syncs"] == 2
    # digits: 1797 images, 359 held out for validation, 1438 // 2 = 719 per node, disjoint (iid)
    assert not set(r0["shard"]) & set(r1["shard"]) and len(r0["shard"]) == len(r1["shard"]) == 719
    assert torch.equal(r0["start"], r1["start"])  # the setup broadcast
    assert not torch.allclose(r0["before_last_sync"], r1["before_last_sync"])  # local steps on different shards
    assert torch.equal(r0["end"], r1["end"])  # consensus after the last sync
    assert not torch.allclose(r0["end"], r0["start"])  # and it trained

    # Closed form, from a fresh copy of the model built here: ring allreduce 2(n-1)/n·B, broadcast (n-1)/n·B.
    from recipes.image_classification import ImageClassifier

    net = ImageClassifier(MODEL, num_classes=10)
    params = sum(p.numel() for p in net.parameters())
    fbufs = sum(b.numel() for b in net.buffers() if b.is_floating_point())
    ibytes = sum(b.numel() * b.element_size() for b in net.buffers() if not b.is_floating_point())
    n = 2
    setup = (n - 1) / n * (4 * (params + fbufs) + ibytes)
    per_sync = 2 * (n - 1) / n * 4 * (params + fbufs + n)  # + the n "holds NaN/Inf" flags
    for r in (r0, r1):
        assert r["bytes"] == pytest.approx({"setup": setup, "sync": 2 * per_sync}, rel=1e-12)
