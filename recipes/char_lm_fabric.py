"""The char-level LM recipe as a Lightning Fabric loop on ``lightning_localsgd.fabric.LocalSGDStrategy``.

The same model (:class:`recipes.char_lm.CharGPT`, used as a plain module) and data
(:class:`recipes.char_lm.StdlibCorpusDataModule`, each rank its own shard) as
``python -m recipes.char_lm``, written the way LitGPT-style research loops are::

    python -m recipes.char_lm_fabric --devices 2 --algorithm diloco --sync-every 32 --max-steps 400
    python -m recipes.char_lm_fabric --devices 2 --algorithm periodic --sync-every 16 --overlap-steps 4 \\
        --fragments 2 --comm-dtype int8 --save runs/char_lm_fabric/last.ckpt
    python -m recipes.char_lm_fabric --devices 2 ... --resume runs/char_lm_fabric/last.ckpt

Validation runs on the consensus (``strategy.consensus()``) every ``--val-every`` steps; the last
line printed is ``final val_loss=...`` on the consensus after ``strategy.finalize()``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric

from lightning_localsgd import DiLoCo, PeriodicAveraging
from lightning_localsgd.fabric import LocalSGDStrategy

from .char_lm import VOCAB_SIZE, CharGPT, StdlibCorpusDataModule


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-byte cross-entropy, through the model's forward (as Fabric wants it)."""
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.char_lm_fabric", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2, help="processes per node")
    p.add_argument("--num-nodes", type=int, default=1, help="> 1: start every rank yourself (recipes.launch)")
    p.add_argument(
        "--within-node", choices=["ddp"], default=None, help="replica groups: DDP inside each node, the sync across"
    )
    p.add_argument("--algorithm", choices=["periodic", "diloco"], default="diloco")
    p.add_argument("--sync-every", type=int, default=32)
    p.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer Nesterov SGD")
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--overlap-steps", type=int, default=0)
    p.add_argument("--fragments", type=int, default=1)
    p.add_argument("--comm-dtype", default=None, help="bfloat16, int8, int4 (default: the model's dtype)")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3, help="inner AdamW")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--max-val-windows", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="fabric.save the run here at the end")
    p.add_argument("--resume", default=None, help="fabric.load this checkpoint first")
    p.add_argument("--json", default=None, help="write the validation curve here (rank 0)")
    return p.parse_args(argv)


def evaluate(fabric: Fabric, model: torch.nn.Module, loader: Any) -> float:
    """Mean validation loss over every rank's shard (the model as it is: call inside consensus())."""
    model.eval()
    total, count = torch.zeros(()), torch.zeros(())
    with torch.no_grad():
        for batch in loader:
            total += lm_loss(model, batch) * len(batch[0])
            count += len(batch[0])
    model.train()
    return float(fabric.all_reduce(total, reduce_op="sum") / fabric.all_reduce(count, reduce_op="sum"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.algorithm == "diloco":
        algorithm: Any = DiLoCo(
            args.sync_every,
            outer_lr=args.outer_lr,
            outer_momentum=args.outer_momentum,
            overlap_steps=args.overlap_steps,
            fragments=args.fragments,
        )
    else:
        algorithm = PeriodicAveraging(args.sync_every, overlap_steps=args.overlap_steps, fragments=args.fragments)
    strategy = LocalSGDStrategy(algorithm=algorithm, comm_dtype=args.comm_dtype, within_node=args.within_node)
    fabric = Fabric(accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy)
    fabric.launch()
    torch.set_num_threads(1)
    fabric.seed_everything(args.seed)  # the same initial model everywhere (rank 0's is broadcast anyway)
    model = CharGPT(n_layer=args.n_layer, d_model=args.d_model, context=args.context, lr=args.lr, warmup_steps=0)
    optimizer = model.configure_optimizers()
    model, optimizer = fabric.setup(model, optimizer)
    data = StdlibCorpusDataModule(
        context=args.context,
        batch_size=args.batch_size,
        max_bytes=args.max_bytes,
        max_val_windows=args.max_val_windows,
        seed=args.seed,
    )
    data.prepare(fabric.global_rank, fabric.world_size)  # each rank its own shard: no distributed sampler
    train = fabric.setup_dataloaders(data.train_dataloader(), use_distributed_sampler=False)
    val = fabric.setup_dataloaders(data.val_dataloader(), use_distributed_sampler=False)
    if args.resume:
        fabric.load(args.resume, {"model": model, "optimizer": optimizer})
    curve: list[dict[str, float]] = []

    def validate() -> None:
        with strategy.consensus():
            loss = evaluate(fabric, model, val)
        curve.append({"step": strategy.step, "val_loss": loss})
        fabric.print(f"step {strategy.step}: val_loss={loss:.4f} (bits/byte {loss / math.log(2):.3f})")

    validate()
    batches = iter(train)
    while strategy.step < args.max_steps:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(train)
            continue
        loss = lm_loss(model, batch)
        fabric.backward(loss)
        optimizer.step()  # a local step; the algorithm's schedule runs inside
        optimizer.zero_grad()
        if strategy.step % args.val_every == 0:
            validate()
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        fabric.save(args.save, {"model": model, "optimizer": optimizer})
    strategy.finalize()  # every rank ends with the consensus
    final = evaluate(fabric, model, val)
    fabric.print(f"final val_loss={final:.4f}")
    result = {
        "curve": curve,
        "final_val_loss": final,
        "args": vars(args),
        "MB_sent": strategy.comm.counters.bytes_sent / 1e6,
    }
    if args.json and fabric.global_rank == 0:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
