"""Bytes each rank holds: sharded replicas (FSDP2 inside a node) against whole replicas (DDP inside), counted.

Every configuration trains the same timm ViT (random init, 32×32 inputs, patch 8) for ``--steps``
optimizer steps on 2 nodes × 2 processes (gloo on 127.0.0.1; no link shaping: bytes held do not
depend on the link) once with ``LocalSGDStrategy(within_node="ddp")`` and once with
``within_node="fsdp"``. After every step each rank counts the tensors it holds
(:func:`benchmarks.common.held_bytes`): storage bytes, each storage once, in five groups:

=============  =====================================================================================
model          parameters (a sharded parameter: this rank's shard) and buffers
grads          their gradients
optimizer      the inner optimizer's state (SGD momentum, or AdamW's two moments)
algorithm      every tensor the consensus algorithm object reaches (anchor, outer optimizer state,
               error-feedback residual, an overlapped sync's snapshot and mean, ModifiedLocalGD's z/q)
transport      the transport's persistent flat buffers (``strategy.comm``)
=============  =====================================================================================

The table reports each group's largest count over the steps and ranks (a step with a sync in
flight holds the most), and model + optimizer + algorithm at the step and rank where their sum is
largest, with the ratio fsdp / ddp of that sum (the target: at most 1/k + ε with k = 2 processes
per node). ``--steps`` should cover two rounds plus the overlap, so that an overlapped sync's
snapshot and the outer optimizer's momentum are held at once (the default: H = 4, 10 steps). Run::

    python -m benchmarks.fsdp_memory                      # all configurations, results/fsdp_memory/
    python -m benchmarks.fsdp_memory --configs diloco_tau2 --steps 6 --name smoke

Writes ``benchmarks/results/<name>/fsdp_memory.json`` and prints a table. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from benchmarks.common import HELD_GROUPS as GROUPS
from benchmarks.common import QUIET_TRAINER, RESULTS, environment, held_bytes, launch_ranks
from recipes.launch import run_rank_from_file

CONFIGS: dict[str, dict[str, Any]] = {
    "periodic": {"algorithm": "periodic", "kwargs": {}},
    "diloco_tau2": {"algorithm": "diloco", "kwargs": {"overlap_steps": 2}},
    "diloco_P2_tau1_int8": {"algorithm": "diloco", "kwargs": {"overlap_steps": 1, "fragments": 2}, "int8": True},
    "diloco_tau2_adamw": {"algorithm": "diloco", "kwargs": {"overlap_steps": 2}, "adamw": True},
    "modified_localgd": {"algorithm": "modified_localgd", "kwargs": {"prox": 0.1}},
}


def run_rank(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration on this rank (a launched process)."""
    import os
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")
    import timm
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

    from lightning_localsgd import DiLoCo, LocalSGDStrategy, ModifiedLocalGD, PeriodicAveraging

    torch.set_num_threads(1)
    per_node = cfg["per_node"]
    rank = int(os.environ["NODE_RANK"]) * per_node + int(os.environ["LOCAL_RANK"])
    config = CONFIGS[cfg["config"]]

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model(cfg["model"], pretrained=False, num_classes=10, img_size=32, patch_size=8)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> Any:
            if config.get("adamw"):
                return torch.optim.AdamW(self.parameters(), lr=1e-4)
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Count(Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, int]] = []

        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            self.steps.append(held_bytes(trainer))

    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))] * cfg["steps"]
    classes = {"periodic": PeriodicAveraging, "diloco": DiLoCo, "modified_localgd": ModifiedLocalGD}
    algorithm = classes[config["algorithm"]](cfg["sync_every"], **config["kwargs"])
    strategy = LocalSGDStrategy(
        within_node=cfg["within_node"],
        comm_dtype="int8" if config.get("int8") else None,
        timeout=timedelta(seconds=300),
    )
    counter = Count()
    seed_everything(0, verbose=False)
    trainer = Trainer(
        devices=per_node,
        num_nodes=cfg["nodes"],
        strategy=strategy,
        max_steps=cfg["steps"],
        use_distributed_sampler=False,
        callbacks=[counter, algorithm],
        **QUIET_TRAINER,
    )
    net = Net()
    whole = sum(p.numel() for p in net.parameters())
    trainer.fit(net, torch.utils.data.DataLoader(batches, batch_size=None))
    peak = {k: max(s[k] for s in counter.steps) for k in GROUPS}
    return {"rank": rank, "num_params": whole, "peak": peak, "steps": counter.steps}


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for config in CONFIGS:
        pair = {w: runs.get(f"{config}/{w}") for w in ("ddp", "fsdp")}
        if any(v is None for v in pair.values()):
            continue
        row: dict[str, Any] = {}
        for w, ranks in pair.items():
            row[w] = {k: max(r["peak"][k] for r in ranks) for k in GROUPS}
            state = lambda c: c["model"] + c["optimizer"] + c["algorithm"]  # noqa: E731
            row[w]["state"] = max(state(c) for r in ranks for c in r["steps"])  # at one moment, the largest
            row[w]["total"] = max(sum(c.values()) for r in ranks for c in r["steps"])
        row["ratio_state"] = row["fsdp"]["state"] / row["ddp"]["state"]
        row["ratio_total"] = row["fsdp"]["total"] / row["ddp"]["total"]
        out[config] = row
    return out


def table(summary: dict[str, Any]) -> str:
    mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        "| configuration | inside | model | grads | optimizer | algorithm | transport | model+opt+alg | fsdp/ddp |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for config, row in summary.items():
        for w in ("ddp", "fsdp"):
            r = row[w]
            ratio = f"**{row['ratio_state']:.3f}**" if w == "fsdp" else ""
            cells = " | ".join(mb(r[k]) for k in (*GROUPS, "state"))
            lines.append(f"| {config} | {w} | {cells} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_memory", description=__doc__.split("\n")[0])
    p.add_argument("--name", default="fsdp_memory")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--model", default="vit_small_patch16_224", help="timm ViT (built with img_size=32, patch_size=8)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sync-every", type=int, default=4)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_rank_from_file(args.worker, run_rank)
        return 0
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}", file=sys.stderr)
        return 2
    runs: dict[str, Any] = {}
    for config in configs:
        for within in ("ddp", "fsdp"):
            cfg = {"config": config, "within_node": within, "model": args.model, "steps": args.steps}
            cfg["sync_every"] = args.sync_every
            ranks, logs = launch_ranks("benchmarks.fsdp_memory", cfg, 4, 2, timeout=900)
            print(f"{config:<22} {within:<5} {'ok' if ranks else 'FAILED'}", flush=True)
            if ranks is None:
                print(logs, file=sys.stderr)
                return 1
            runs[f"{config}/{within}"] = ranks
    summary = summarize(runs)
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "fsdp_memory",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": args.model, "steps": args.steps, "sync_every": args.sync_every, "nodes": 2, "per_node": 2},
        "environment": environment("timm"),
        "summary": summary,
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "steps"} for r in v] for k, v in runs.items()},
    }
    (out / "fsdp_memory.json").write_text(json.dumps(result, indent=1))
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
