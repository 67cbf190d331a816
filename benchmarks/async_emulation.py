"""Asynchronous Local-SGD (seed 001) in one process: the library's server objects driven by an event queue.

Liu et al., "Asynchronous Local-SGD Training for Language Modeling" (arXiv 2401.09135): 4 workers
at 0.58 / 0.75 / 1.51 / 3.33 s per step, H = 20, inner AdamW. Instead of sleeping, every worker's
step takes that many **virtual** seconds, so a run is exactly reproducible and reaches hundreds of
outer updates in minutes on one core:

* a worker pulls θ at virtual time t, runs H_i inner steps (real AdamW steps on its own shard,
  its optimizer state kept across rounds) and its push arrives at t + H_i · s_i;
* the pushes are applied in arrival order by the library's own :class:`ParameterServer`
  (``handle(MessageType.PUSH, ...)``: staleness, DyLU's H_i from the reported speeds 1/s_i) with the
  library's :class:`DelayedNesterov` or :class:`OuterSGD`; the pushing worker continues at once
  from the returned θ;
* sync DiLoCo: every round all workers start from θ and the round ends when the slowest is done
  (max_i H · s_i); then one ``OuterSGD(lr, momentum, nesterov=True)`` step on the mean
  pseudo-gradient (exactly DiLoCo's outer step, torch.optim.SGD).

**Updates** = pseudo-gradients applied / n (sync: rounds; async: pushes / 4, for DN one momentum
block). The global model is evaluated after every update on the same validation windows.

Variants are ``kind@lr`` with kind in ``sync``, ``nesterov`` (naive async OuterSGD Nesterov),
``dn`` (DelayedNesterov, every worker H steps), ``dn_dylu`` (DN + dynamic local updates),
``nesterov_dylu``; momentum 0.9 everywhere. Run::

    python -m benchmarks.async_emulation --seeds 0 1 2            # the decision run (see docs/results/async.md)
    python -m benchmarks.async_emulation --updates 20 --seeds 0 --name async_emulation_smoke

Writes ``benchmarks/results/<name>/async_emulation_seed<s>.json`` per seed; the report
(:mod:`benchmarks.async_report`) reads them.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

import torch

from benchmarks.common import RESULTS, environment

PAPER_STEP_SECONDS = [0.58, 0.75, 1.51, 3.33]
DEFAULT_VARIANTS = ["sync@0.7", "nesterov@0.07", "dn@0.7", "dn_dylu@0.7"]
MODEL = {"n_layer": 1, "n_head": 4, "d_model": 64, "context": 64}


def parse_variant(spec: str) -> tuple[str, float]:
    kind, _, lr = spec.partition("@")
    if kind not in ("sync", "nesterov", "dn", "dn_dylu", "nesterov_dylu") or not lr:
        raise ValueError(f"a variant is kind@lr with kind in sync, nesterov, dn, dn_dylu, nesterov_dylu, got {spec!r}")
    return kind, float(lr)


class Corpus:
    """Byte windows of the standard library's source: each worker its own shard, a fixed validation set."""

    def __init__(self, context: int, batch: int, workers: int, seed: int, val_windows: int = 128) -> None:
        from recipes.char_lm import stdlib_corpus

        data, _ = stdlib_corpus(2_000_000)
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        cut = int(len(tokens) * 0.9)
        self.train, self.val, self.context, self.batch = tokens[:cut], tokens[cut:], context, batch
        n = (len(self.train) - 1) // context
        self.shards = [torch.arange(r, n - n % workers, workers) for r in range(workers)]
        self.gens = [torch.Generator().manual_seed(10_000 * seed + r) for r in range(workers)]
        self.order = [torch.empty(0, dtype=torch.long) for _ in range(workers)]
        idx = torch.arange(min(val_windows, (len(self.val) - 1) // context)) * context
        self.val_x = torch.stack([self.val[i : i + context] for i in idx])
        self.val_y = torch.stack([self.val[i + 1 : i + context + 1] for i in idx])

    def next_batch(self, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.order[worker]) < self.batch:  # a new epoch of this shard, reshuffled
            shard = self.shards[worker]
            self.order[worker] = shard[torch.randperm(len(shard), generator=self.gens[worker])]
        ids, self.order[worker] = self.order[worker][: self.batch], self.order[worker][self.batch :]
        starts = ids * self.context
        x = torch.stack([self.train[s : s + self.context] for s in starts])
        y = torch.stack([self.train[s + 1 : s + self.context + 1] for s in starts])
        return x, y


class Worker:
    """One replica with its own AdamW (state kept across rounds) and linear warm-up over its own steps."""

    def __init__(self, rank: int, init: list[torch.Tensor], cfg: dict[str, Any]) -> None:
        from recipes.char_lm import CharGPT

        self.rank, self.model = rank, CharGPT(**MODEL)
        self.params = list(self.model.parameters())
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and n != "pos"]
        rest = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and n != "pos")]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
            lr=cfg["inner_lr"],
            betas=(0.9, 0.95),
            foreach=True,
        )
        self.lr, self.warmup, self.steps = cfg["inner_lr"], cfg["warmup"], 0
        self.load(init)

    def load(self, flat_or_list: Any) -> None:
        copy_into(flat_or_list, self.params)

    def run(self, corpus: Corpus, steps: int) -> torch.Tensor:
        """``steps`` AdamW steps from the loaded model; returns the flat replica."""
        for _ in range(steps):
            for group in self.opt.param_groups:
                group["lr"] = self.lr * min(1.0, (self.steps + 1) / self.warmup)
            loss = self.model.loss(corpus.next_batch(self.rank))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.steps += 1
        return torch.nn.utils.parameters_to_vector(self.params).detach()


@torch.no_grad()
def copy_into(source: torch.Tensor | list[torch.Tensor], params: list[torch.Tensor]) -> None:
    """Copy a flat vector (or a list of tensors) into ``params`` (no aliasing, unlike vector_to_parameters)."""
    chunks = source.split([p.numel() for p in params]) if isinstance(source, torch.Tensor) else source
    for p, q in zip(params, chunks, strict=True):
        p.copy_(q.view_as(p))


@torch.no_grad()
def val_loss(evaluator: Any, theta: torch.Tensor, corpus: Corpus) -> float:
    copy_into(theta, list(evaluator.parameters()))
    return float(evaluator.loss((corpus.val_x, corpus.val_y)))


def run_variant(spec: str, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One variant for one seed; the curve holds (updates, virtual seconds, inner steps, val loss)."""
    from lightning_localsgd.asynchronous.optimizers import DelayedNesterov, OuterSGD
    from lightning_localsgd.asynchronous.protocol import MessageType
    from lightning_localsgd.asynchronous.server import ParameterServer
    from recipes.char_lm import CharGPT

    kind, lr = parse_variant(spec)
    n, H, target = cfg["workers"], cfg["H"], cfg["updates"]
    secs = [cfg["time_scale"] * s for s in PAPER_STEP_SECONDS[:n]]
    torch.manual_seed(seed)
    init = [p.detach().clone() for p in CharGPT(**MODEL).parameters()]  # same start for every variant of a seed
    corpus = Corpus(MODEL["context"], cfg["batch"], n, seed)
    workers = [Worker(r, init, cfg) for r in range(n)]
    evaluator = CharGPT(**MODEL).eval()
    theta = torch.nn.utils.parameters_to_vector(init).clone()
    curve = [{"updates": 0.0, "time": 0.0, "inner_steps": 0, "val_loss": val_loss(evaluator, theta, corpus)}]
    info: dict[str, Any] = {"variant": spec, "kind": kind, "lr": lr, "seed": seed}
    started = time.perf_counter()
    if kind == "sync":
        outer = OuterSGD(lr=lr, momentum=cfg["momentum"], nesterov=True)
        outer.bind([theta], n)
        clock, steps = 0.0, 0
        for k in range(1, target + 1):
            replicas = []
            for w in workers:
                w.load(theta)
                replicas.append(w.run(corpus, H))
            outer.step([theta - torch.stack(replicas).mean(0)])
            clock += max(H * s for s in secs)  # every round waits for the slowest worker
            steps += n * H
            curve.append(
                {
                    "updates": float(k),
                    "time": clock,
                    "inner_steps": steps,
                    "val_loss": val_loss(evaluator, theta, corpus),
                }
            )
        info["pushes"] = [target] * n
    else:
        dylu = kind.endswith("_dylu")
        opt = (
            OuterSGD(lr=lr, momentum=cfg["momentum"], nesterov=True)
            if kind.startswith("nesterov")
            else DelayedNesterov(lr=lr, momentum=cfg["momentum"])
        )
        server = ParameterServer(
            theta.clone(), theta.numel(), opt, n, sync_every=H, dynamic_local_steps=dylu, timeout=1e12
        )
        anchors = [server.state.clone() for _ in range(n)]
        local = [H] * n
        events = [(local[r] * secs[r], r) for r in range(n)]  # (arrival time, worker); ties: lower rank first
        heapq.heapify(events)
        steps, stale, hist = 0, [], []
        while server.updates < target * n:
            clock, r = heapq.heappop(events)
            w = workers[r]
            w.load(anchors[r])
            g = anchors[r] - w.run(corpus, local[r])
            steps += local[r]
            reply = server.handle(MessageType.PUSH, r, local[r], 1.0 / secs[r], g)
            stale.append(reply.staleness)
            hist.append((r, local[r]))
            anchors[r], local[r] = reply.state, reply.local_steps
            heapq.heappush(events, (clock + local[r] * secs[r], r))
            if server.updates % n == 0:
                curve.append(
                    {
                        "updates": server.updates / n,
                        "time": clock,
                        "inner_steps": steps,
                        "val_loss": val_loss(evaluator, server.state, corpus),
                    }
                )
        info.update(
            pushes=list(server.pushes),
            steps=list(server.steps),
            final_local_steps=list(server.local_steps),
            staleness_mean=sum(stale) / len(stale),
            staleness_max=max(stale),
            local_steps_seen={str(r): sorted({h for q, h in hist if q == r}) for r in range(n)},
        )
    info.update(curve=curve, seconds=time.perf_counter() - started)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.async_emulation", description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="async_emulation")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="kind@lr, e.g. dn_dylu@0.7")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--updates", type=int, default=150, help="outer updates per variant (pushes / n for async)")
    ap.add_argument("--H", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--inner-lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20, help="inner linear warm-up, each worker's own steps")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--time-scale", type=float, default=1.0, help="virtual seconds per step = this × paper's")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = {
        "workers": 4,
        "H": args.H,
        "updates": args.updates,
        "batch": args.batch,
        "inner_lr": args.inner_lr,
        "warmup": args.warmup,
        "momentum": args.momentum,
        "time_scale": args.time_scale,
        "model": MODEL,
    }
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        path = out / f"async_emulation_seed{seed}.json"
        doc = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
        for spec in args.variants:
            load = os.getloadavg()
            run = run_variant(spec, seed, cfg)
            run.update(loadavg_before=load, loadavg_after=os.getloadavg())
            doc["runs"][spec] = run
            doc.update(
                config=cfg,
                seed=seed,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                environment=environment(),
                command="python -m benchmarks.async_emulation " + " ".join(sys.argv[1:] if argv is None else argv),
            )
            path.write_text(json.dumps(doc, indent=1))  # after every variant: a killed run keeps what it has
            last = run["curve"][-1]
            print(
                f"seed {seed} {spec:<16} loss {last['val_loss']:.4f} after {last['updates']:.0f} updates, "
                f"{last['time']:.0f} virtual s, {last['inner_steps']} inner steps ({run['seconds']:.0f} s real, "
                f"load {load[0]:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
