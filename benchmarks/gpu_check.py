"""``make gpu-check``: the GPU paths of the library, run where a CUDA GPU exists, in a few minutes.

    python -m benchmarks.gpu_check                 # on a machine with >= 1 CUDA GPU; writes docs/results/gpu.md
    python -m benchmarks.gpu_check --device cpu --quick   # the same script on the CPU (a dry run of the check)

What it runs (2 ranks; with one GPU both ranks share it, over gloo, as two "nodes" of one device):

1. **Correctness**: every algorithm x wire {fp32, bf16, int8} x {blocking, overlap} x {Trainer, Fabric}
   for ``--steps`` optimizer steps on the GPU, then the same run on the CPU: the final models must
   agree within ``TOLERANCE`` relative to the distance training moved them (float rounding differs
   between devices; a wrong merge, a lost term or a device mix-up does not stay that close). DiLoCo
   with ``anchor_device="cpu"`` and overlap, and the async strategy (its server in host memory),
   run too.
2. **Memory**: peak GPU memory of each configuration (``torch.cuda.max_memory_allocated``) in copies of
   the model's fp32 parameters above the same training with no sync at all; docs/gpu.md's table
   gives the extra memory each configuration holds between steps (counted by tests/test_memory.py).
3. **Speed**, with >= 2 GPUs (NCCL, one GPU per rank): step time with overlap vs blocking vs the
   no-communication floor. With one GPU this part says it needs two.
4. **Quantization throughput**: int8/int4 quantize + dequantize against a plain copy, in GB/s.

On a machine without CUDA (and without ``--device cpu``) it says so and exits 2. It is not part of
``make test``: the project's CI machines have no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import ROOT, environment, global_rank, launch_ranks

DOCS = ROOT / "docs" / "results"
TOLERANCE = 1e-3  # |GPU − CPU| / |CPU final − CPU start|; fp32 rounding differences are ~1e-6
ALGORITHMS = [
    "periodic",
    "periodic_offload",
    "diloco",
    "diloco_cpu_anchor",
    "diloco_offload",
    "modified_localgd",
    "modified_localgd_offload",
    "lsgd",
    "easgd",
    "gradalign",
]
WIRES = ["fp32", "bf16", "int8"]
OVERLAP = {"periodic", "periodic_offload", "diloco", "diloco_cpu_anchor", "diloco_offload"}  # can overlap


def configurations(quick: bool, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Every configuration the check runs (``only``: those whose name starts with one of these; the floor stays)."""
    out = []
    for algorithm in ALGORITHMS:
        for wire in WIRES:
            if algorithm == "lsgd" and wire != "fp32":
                continue  # LSGD broadcasts raw parameters: it refuses a comm_dtype
            for overlap in (0, 2) if algorithm in OVERLAP else (0,):
                for front in ("trainer", "fabric"):
                    if quick and (wire == "bf16" or (front == "fabric" and algorithm not in ("periodic", "diloco"))):
                        continue
                    out.append({"algorithm": algorithm, "wire": wire, "overlap": overlap, "front": front})
    out.append({"algorithm": "async", "wire": "fp32", "overlap": 0, "front": "trainer"})
    if only:
        out = [c for c in out if name_of(c).startswith(tuple(only))]
    out.append({"algorithm": "none", "wire": "fp32", "overlap": 0, "front": "trainer"})  # the memory floor
    return out


def name_of(c: dict[str, Any]) -> str:
    return f"{c['algorithm']}/{c['wire']}/tau{c['overlap']}/{c['front']}"


# ---------------------------------------------------------------------------------------------- one rank
class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def make_algorithm(c: dict[str, Any]) -> list[Any]:
    from lightning_localsgd import DiLoCo, ElasticAveraging, GradAlign, LeaderSGD, ModifiedLocalGD, PeriodicAveraging

    tau = c["overlap"]
    return {
        "periodic": lambda: [PeriodicAveraging(4, overlap_steps=tau)],
        "diloco": lambda: [DiLoCo(4, overlap_steps=tau)],
        "diloco_cpu_anchor": lambda: [DiLoCo(4, overlap_steps=tau, anchor_device="cpu")],
        "periodic_offload": lambda: [PeriodicAveraging(4, overlap_steps=tau, offload=True)],
        "diloco_offload": lambda: [DiLoCo(4, overlap_steps=tau, offload=True)],
        "modified_localgd_offload": lambda: [ModifiedLocalGD(4, prox=0.5, offload=True)],
        "modified_localgd": lambda: [ModifiedLocalGD(4, prox=0.5)],
        "lsgd": lambda: [LeaderSGD(4, pull=0.5)],
        "easgd": lambda: [ElasticAveraging(4)],
        "gradalign": lambda: [PeriodicAveraging(1), GradAlign(beta=0.05)],
        "none": lambda: [PeriodicAveraging(10_000)],
    }[c["algorithm"]]()


def batches(rank: int, steps: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(steps, 16, 32, generator=g)
    y = torch.sin(x.sum(-1))
    return [(x[i].to(device), y[i].to(device)) for i in range(steps)]


def run_trainer(c: dict[str, Any], cfg: dict[str, Any], rank: int) -> MLP:
    from lightning.pytorch import LightningModule, Trainer

    from lightning_localsgd import AsyncLocalSGDStrategy, LocalSGDStrategy

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = MLP(cfg["width"])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    module = Module()
    wire = {"fp32": None, "bf16": "bfloat16", "int8": "int8"}[c["wire"]]
    if c["algorithm"] == "async":
        strategy: Any = AsyncLocalSGDStrategy(sync_every=4, process_group_backend="gloo")
        callbacks: list[Any] = []
    else:
        strategy = LocalSGDStrategy(comm_dtype=wire, process_group_backend="gloo")
        callbacks = make_algorithm(c)
    accelerator = "gpu" if cfg["device"] == "cuda" else "cpu"
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        num_nodes=cfg["world"],  # one process per "node": both ranks may share one GPU
        strategy=strategy,
        callbacks=callbacks,
        max_steps=cfg["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = batches(rank, cfg["steps"], "cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return module.model


def run_fabric(c: dict[str, Any], cfg: dict[str, Any], rank: int) -> MLP:
    from lightning.fabric import Fabric

    from lightning_localsgd.fabric import LocalSGDStrategy

    algorithms = make_algorithm(c)
    modifier = algorithms[1] if len(algorithms) > 1 else None
    wire = {"fp32": None, "bf16": "bfloat16", "int8": "int8"}[c["wire"]]
    strategy = LocalSGDStrategy(
        algorithm=algorithms[0], gradient_modifier=modifier, comm_dtype=wire, process_group_backend="gloo"
    )
    accelerator = "cuda" if cfg["device"] == "cuda" else "cpu"
    fabric = Fabric(accelerator=accelerator, devices=1, num_nodes=cfg["world"], strategy=strategy)
    fabric.launch()
    torch.manual_seed(0)
    model = MLP(cfg["width"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    for x, y in batches(rank, cfg["steps"], str(fabric.device)):

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            loss = nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            return loss

        optimizer.step(closure)
        optimizer.zero_grad()
    strategy.finalize()
    return model.module if hasattr(model, "module") else model


def run_rank(cfg: dict[str, Any]) -> dict[str, Any]:
    rank = global_rank(cfg["per_node"])
    torch.set_num_threads(1)
    out: dict[str, Any] = {"rank": rank, "runs": {}}
    for c in cfg["configurations"]:
        name = name_of(c)
        if cfg["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        start = torch.cat([p.detach().reshape(-1) for p in MLP(cfg["width"]).parameters()])
        begun = time.perf_counter()
        try:
            model = run_fabric(c, cfg, rank) if c["front"] == "fabric" else run_trainer(c, cfg, rank)
            end = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
            record: dict[str, Any] = {
                "start": start.tolist(),
                "end": end.tolist(),
                "devices": sorted({str(p.device) for p in model.parameters()}),
            }
        except Exception as err:  # one broken configuration must not hide the others
            record = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        record["seconds"] = time.perf_counter() - begun
        if cfg["device"] == "cuda":
            record["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["runs"][name] = record
    return out


# ---------------------------------------------------------------------------------------------- the report
def quantization_throughput(device: str, numel: int) -> dict[str, float]:
    from lightning_localsgd.transport.quantize import BLOCK, dequantize, quantize

    numel = numel // BLOCK * BLOCK
    x = torch.randn(numel, device=device)
    out: dict[str, float] = {}

    def timed(fn: Any) -> float:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / 5

    out["copy_GBps"] = x.numel() * 4 / timed(lambda: x.clone()) / 1e9
    for fmt in ("int8", "int4"):
        packet = quantize(x, fmt)
        seconds = timed(lambda fmt=fmt, packet=packet: (quantize(x, fmt), dequantize(packet, numel, fmt, x.dtype)))
        out[f"{fmt}_quantize_dequantize_GBps"] = x.numel() * 4 / seconds / 1e9
    return out


def compare(gpu: dict[str, Any], cpu: dict[str, Any], floor_bytes: float | None, model_bytes: int) -> list[dict]:
    rows = []
    for name, g in gpu.items():
        c = cpu.get(name, {})
        row: dict[str, Any] = {"configuration": name, "seconds": g.get("seconds")}
        if "error" in g or "error" in c:
            row["verdict"] = "ERROR"
            row["error"] = g.get("error") or f"(cpu) {c.get('error')}"
        else:
            gpu_end, cpu_end, start = (torch.tensor(v) for v in (g["end"], c["end"], c["start"]))
            moved = float((cpu_end - start).norm()) or 1.0
            gap = float((gpu_end - cpu_end).norm()) / moved
            row.update(gap=gap, devices=g["devices"], verdict="ok" if gap <= TOLERANCE else "MISMATCH")
            if name.startswith("async/"):  # the push order differs between runs: finite, trained, on the device
                trained = bool(torch.isfinite(gpu_end).all()) and float((gpu_end - start).norm()) > 0
                row["verdict"] = "ok (trained; order-dependent)" if trained else "MISMATCH"
                row.pop("gap")
        if "peak_bytes" in g and floor_bytes is not None:
            row["peak_extra_copies"] = (g["peak_bytes"] - floor_bytes) / model_bytes
        rows.append(row)
    return rows


def write_page(report: dict[str, Any], path: Path) -> None:
    lines = [
        "# GPU check (`make gpu-check`)",
        "",
        f"Run {report['date']} on {report['environment'].get('gpu', 'no GPU')}, torch {report['environment']['torch']};"
        f" device under test: `{report['device']}`; {report['steps']} steps per configuration, 2 ranks over gloo"
        " (both on one GPU when there is one). Written by `python -m benchmarks.gpu_check`; the JSON is"
        f" `docs/results/{path.stem}.json`.",
        "",
        f"Correctness: the final model of each configuration against the same run on the CPU, relative to the"
        f" distance training moved it (tolerance {TOLERANCE:g}). Peak extra memory: the configuration's"
        " `torch.cuda.max_memory_allocated` above the same training without syncs, in fp32 model copies.",
        "",
        "| configuration | verdict | gap | peak extra (model copies) | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        gap = f"{row['gap']:.2e}" if "gap" in row else "–"
        peak = f"{row['peak_extra_copies']:.2f}" if "peak_extra_copies" in row else "–"
        verdict = row["verdict"] + (f": `{row['error'][:160]}`" if "error" in row else "")
        lines.append(f"| {row['configuration']} | {verdict} | {gap} | {peak} | {row.get('seconds', 0):.1f} |")
    lines += ["", "Quantization throughput on the device (GB/s of fp32 input):", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in report["quantization"].items()]
    lines += ["", f"Speed with >= 2 GPUs: {report['speed']}", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="the device under test")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    ap.add_argument("--quick", action="store_true", help="fewer configurations (a dry run)")
    ap.add_argument("--only", nargs="*", help="configurations whose name starts with one of these")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds for each launch of 2 ranks")
    ap.add_argument("--out", default=None, help="default: docs/results/gpu.md (cuda), benchmarks/results/ (cpu)")
    args = ap.parse_args(argv)
    if args.worker:
        from recipes.launch import run_rank_from_file

        run_rank_from_file(args.worker, run_rank)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing was checked.")
        print("Run it where a GPU is lent (docs/gpu.md), or `--device cpu --quick` for a dry run of the script.")
        return 2
    configs = configurations(args.quick, args.only)
    base = {"configurations": configs, "steps": args.steps, "width": args.width}
    results = {}
    for device in dict.fromkeys([args.device, "cpu"]):
        runs, log = launch_ranks(
            "benchmarks.gpu_check", dict(base, device=device), world=2, nodes=2, timeout=args.timeout
        )
        if runs is None:
            print(log[-4000:])
            return 1
        results[device] = runs[0]["runs"]
    model_bytes = sum(p.numel() * 4 for p in MLP(args.width).parameters())
    floor = results[args.device].get(name_of(configs[-1]), {}).get("peak_bytes")
    rows = compare(results[args.device], results["cpu"], floor, model_bytes)
    env = environment("torch", "lightning")
    if torch.cuda.is_available():
        env["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    speed = "not run: needs >= 2 GPUs (NCCL, one per rank)" if torch.cuda.device_count() < 2 else "see step_time"
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "steps": args.steps,
        "environment": env,
        "rows": rows,
        "quantization": quantization_throughput(args.device, 16_000_000 if args.device == "cuda" else 1_000_000),
        "speed": speed,
    }
    out = Path(args.out or (DOCS / "gpu.md" if args.device == "cuda" else ROOT / "benchmarks/results/gpu_check_cpu.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    write_page(report, out)
    bad = [r for r in rows if not r["verdict"].startswith("ok")]
    for row in rows:
        print(f"{row['configuration']:42s} {row['verdict']:10s} gap={row.get('gap', float('nan')):.2e}")
    print(f"wrote {out} and {out.with_suffix('.json')}; {len(bad)} of {len(rows)} configurations not ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
