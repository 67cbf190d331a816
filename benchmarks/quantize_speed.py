"""Integer transport's local work against plain copies of the same tensor, one CPU thread (issue 24).

Times (best of ``--repeats``) on ``--numel`` fp32 values (default 11.2 M, resnet18's parameters):

* ``copy_``: a plain fp32 copy into a warm buffer; ``clone``: a copy into a new tensor;
* ``quantize``: the int8 (and int4) packet into a preallocated buffer; ``quantize+error``: the same
  with the rounding error written in place (what one int8 sync does for this rank's values);
* ``dequantize``: a packet into a preallocated fp32 buffer; ``dequantize+=``: added into it (the
  sum of the received packets);
* ``old two-pass``: quantize, then dequantize the packet again and subtract (the residual before
  the fused error).

Run: ``python -m benchmarks.quantize_speed`` (about 10 s). Writes
``docs/results/quantize_speed.json`` and prints a table. Issue 24's target: int8 quantize ≤ 2.5×
a plain fp32 copy.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import ROOT
from lightning_localsgd.transport.quantize import dequantize, packet_bytes, quantize


def best(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm
    out = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=11_200_000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n = args.numel // 128 * 128
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    buf, error = torch.empty_like(x), torch.empty_like(x)
    rows: dict[str, float] = {
        "copy_": best(lambda: buf.copy_(x), args.repeats),
        "clone": best(lambda: x.clone(), args.repeats),
    }
    for fmt in ("int8", "int4"):
        packet = torch.empty(packet_bytes(n, fmt), dtype=torch.uint8)
        rows[f"{fmt} quantize"] = best(lambda fmt=fmt, packet=packet: quantize(x, fmt, out=packet), args.repeats)
        rows[f"{fmt} quantize+error"] = best(
            lambda fmt=fmt, packet=packet: quantize(x, fmt, out=packet, error=error), args.repeats
        )
        rows[f"{fmt} dequantize"] = best(
            lambda fmt=fmt, packet=packet: dequantize(packet, n, fmt, out=buf), args.repeats
        )
        rows[f"{fmt} dequantize+="] = best(
            lambda fmt=fmt, packet=packet: dequantize(packet, n, fmt, out=buf, accumulate=True), args.repeats
        )
        rows[f"{fmt} old two-pass"] = best(
            lambda fmt=fmt, packet=packet: torch.sub(x, dequantize(quantize(x, fmt, out=packet), n, fmt), out=error),
            args.repeats,
        )
    copy = rows["copy_"]
    print(f"{n / 1e6:.1f} M fp32 values, 1 thread, best of {args.repeats}")
    for name, seconds in rows.items():
        ratios = f"{seconds / copy:6.2f}x copy_  {seconds / rows['clone']:6.2f}x clone"
        print(f"{name:<22} {1e3 * seconds:8.2f} ms  {ratios}")
    out = {
        "command": "python -m benchmarks.quantize_speed",
        "numel": n,
        "threads": 1,
        "repeats": args.repeats,
        "seconds": rows,
        "x_copy": {k: v / copy for k, v in rows.items()},
        "x_clone": {k: v / rows["clone"] for k, v in rows.items()},
    }
    path = ROOT / "docs" / "results" / "quantize_speed.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
