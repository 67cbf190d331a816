"""Overlapped/fragmented syncs and the integer transport on 2 real gloo ranks, against plain torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from tests.launch import run_ranks
from tests.scenarios_leader import shard_batch, tinynet_start

STEPS, LR = 10, 0.1


def reference(
    steps: int, H: int, P: int, tau: int, outer: tuple[float, float] | None, alpha: float | None = None, origin: int = 0
):
    """Two plain-torch replicas (SGD lr 0.1, momentum 0.5) with staggered, overlapped fragment syncs.

    Fragment p (values ⌊pN/P⌋:⌊(p+1)N/P⌋) is sent at steps s = origin + ⌊(p+1)H/P⌋ + kH and merged at s + τ:
    x ← x + (c − x⁽ˢ⁾) (or the α-mix), with c the mean of what was sent, or for DiLoCo (outer =
    (lr, momentum), plain momentum SGD) θ ← θ − lr·buf, buf ← μ·buf + (θ − mean).
    """
    models = [tinynet_start(0.5) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=0.5) for m in models]
    flat = lambda m: parameters_to_vector(m.parameters()).detach().clone()  # noqa: E731
    n = flat(models[0]).numel()
    bounds = [k * n // P for k in range(P + 1)]
    theta = flat(models[0])
    bufs: list[torch.Tensor | None] = [None] * P
    inflight: dict[int, tuple[int, list[torch.Tensor]]] = {}
    after: list[list[torch.Tensor]] = [[], []]

    def land(p: int, sent: list[torch.Tensor], blocking: bool = False) -> None:
        lo, hi = bounds[p], bounds[p + 1]
        mean = (sent[0] + sent[1]) / 2
        target = mean
        if outer is not None:
            lr, mu = outer
            delta = theta[lo:hi] - mean
            bufs[p] = delta.clone() if bufs[p] is None else mu * bufs[p] + delta
            theta[lo:hi] -= lr * bufs[p]
            target = theta[lo:hi]
        for r, m in enumerate(models):
            x = flat(m)
            if blocking:
                x[lo:hi] = target
            elif alpha is None:
                x[lo:hi] = x[lo:hi] + (target - sent[r])
            else:
                x[lo:hi] = (1 - alpha) * target + alpha * x[lo:hi]
            vector_to_parameters(x, m.parameters())

    for s in range(1, steps + 1):
        for r, (m, opt) in enumerate(zip(models, opts)):
            x, y = shard_batch(s - 1, r, 2)
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        for p, (start, _) in list(inflight.items()):
            if start + tau == s:
                land(p, inflight.pop(p)[1])
        for p in range(P):
            since = s - origin - (p + 1) * H // P
            if since >= 0 and since % H == 0:
                sent = [flat(m)[bounds[p] : bounds[p + 1]].clone() for m in models]
                if tau == 0:
                    land(p, sent, blocking=True)
                else:
                    inflight[p] = (s, sent)
        for r in range(2):
            after[r].append(flat(models[r]))
    for p in list(inflight):  # the end of fit: what is in flight lands now, then one blocking sync of all fragments
        land(p, inflight.pop(p)[1])
    for p in range(P):
        land(p, [flat(m)[bounds[p] : bounds[p + 1]].clone() for m in models], blocking=True)
    return after, flat(models[0])


CASES = {
    "periodic P=2 τ=1": ("periodic", dict(sync_every=4, fragments=2, overlap_steps=1), None, None),
    "periodic P=1 τ=3 α=0.5": ("periodic", dict(sync_every=4, overlap_steps=3, merge_alpha=0.5), None, 0.5),
    "periodic P=3 τ=0": ("periodic", dict(sync_every=3, fragments=3), None, None),
    "diloco P=2 τ=2": (
        "diloco",
        dict(sync_every=4, fragments=2, overlap_steps=2, outer_lr=0.5, outer_momentum=0.8, nesterov=False),
        (0.5, 0.8),
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_overlapped_fragmented_training_matches_a_plain_torch_reference(case):
    algorithm, kwargs, outer, alpha = CASES[case]
    runs = run_ranks("tests.scenarios_overlap:overlap_run", world=2, steps=STEPS, algorithm=algorithm, kwargs=kwargs)
    after, final = reference(
        STEPS, kwargs["sync_every"], kwargs.get("fragments", 1), kwargs.get("overlap_steps", 0), outer, alpha
    )
    for r in range(2):
        got = torch.stack(runs[r]["after"])
        assert (got - torch.stack(after[r])).abs().max() <= 1e-12, case
        assert (runs[r]["final"] - final).abs().max() <= 1e-12, case  # after fit every rank holds the consensus
    assert (torch.stack(runs[0]["after"]) - torch.stack(runs[1]["after"])).abs().max() > 1e-3  # replicas drift


@pytest.mark.parametrize("algorithm", ["periodic", "diloco"])
def test_resume_with_a_sync_in_flight_and_with_fragments_is_exact(algorithm):
    # H = 4, P = 2, τ = 1: fragment 0 goes out at 2, 6 (lands 3, 7), fragment 1 at 4, 8 (lands 5, 9)
    kwargs = dict(sync_every=4, fragments=2, overlap_steps=1)
    r0, r1 = run_ranks(
        "tests.scenarios_diloco:resume", world=2, steps=10, save_at=(2, 4, 5), algorithm=algorithm, kwargs=kwargs
    )
    for r in (r0, r1):
        for start in (2, 4, 5):
            assert torch.equal(r[start], r[0][start:]), start
    assert (r0[0][2] - r1[0][2]).abs().max() > 1e-4


@pytest.mark.parametrize(("fmt", "ratio"), [("int8", 0.29), ("int4", 0.15)])
def test_integer_transport_error_feedback_loses_nothing_and_shrinks_the_bytes(fmt, ratio):
    n, rounds = 1000, 5
    runs = run_ranks("tests.scenarios_overlap:error_feedback", world=2, fmt=fmt, rounds=rounds, n=n)
    # what every round delivered plus what the ranks still owe equals the sum of the true deltas
    owed = runs[0]["residual"] + runs[1]["residual"]
    assert torch.equal(runs[0]["delivered"], runs[1]["delivered"])  # every rank got the same mean
    assert (runs[0]["delivered"] + owed - runs[0]["truth"]).abs().max() <= 1e-12
    assert owed.abs().max() > 0  # rounding really dropped something, and it is owed, not lost
    fp32_bytes = 2 * (2 - 1) / 2 * n * 4  # the fp32 allreduce of the same vector on 2 ranks
    assert runs[0]["bytes_per_round"] <= ratio * fp32_bytes
    assert runs[0]["bytes_per_round"] > 0.5 * ratio * fp32_bytes  # the counter is not trivially zero
