"""The consensus guarantee and exact resume, on 2 real gloo ranks."""

import torch

from tests.launch import run_ranks


def test_consensus_in_evaluation_checkpoints_and_after_fit_and_exact_resume():
    steps, H = 10, 3  # validation and a checkpoint after every step; syncs at 3, 6, 9 (and the final one)
    r0, r1 = run_ranks("tests.scenarios_core:resume_and_evaluate", world=2, timeout=480, steps=steps, sync_every=H)
    full = [r0["full"], r1["full"]]

    # evaluating never perturbs training: the run with validation and checkpoints equals the plain one
    for r in (r0, r1):
        assert torch.equal(r["full"]["after"][:-1], r["plain"]["after"][:-1])

    # validation after step s ran on the mean of the replicas, on both ranks
    for i, s in enumerate(range(1, steps + 1)):
        mean = (full[0]["after"][s - 1] + full[1]["after"][s - 1]) / 2
        for f in full:
            assert (f["val_params"][i] - mean).abs().max() <= 1e-12
    assert not torch.allclose(full[0]["after"][3], full[1]["after"][3])  # step 4 is mid-period

    # a checkpoint stores the consensus as its model, and every rank's own replica beside it
    names = list(r0["checkpoints"][4]["state_dict"])
    for s in (3, 4, 6):
        ckpt = r0["checkpoints"][s]
        saved = torch.cat([ckpt["state_dict"][n].reshape(-1) for n in names])
        mean = (full[0]["after"][s - 1] + full[1]["after"][s - 1]) / 2
        assert (saved - mean).abs().max() <= 1e-12
        for rank in (0, 1):
            replica = ckpt["parts"][rank]["model"]
            assert torch.equal(torch.cat([replica[n].reshape(-1) for n in names]), full[rank]["after"][s - 1])
        # every rank's momentum travels too: torch SGD steps x_s = x_{s-1} - lr * b_s on each rank, and at a
        # sync (3, 6) both ranks then hold the mean, so the buffers of the first parameter (net.0.weight,
        # which leads the flat vectors) follow from the recorded parameters
        ranks = ckpt["parts"]
        b = [ranks[r]["optimizer_states"][0]["state"][0]["momentum_buffer"].reshape(-1) for r in (0, 1)]
        n, lr = b[0].numel(), 0.1
        prev = [full[r]["after"][s - 2][:n] for r in (0, 1)]
        now = [full[r]["after"][s - 1][:n] for r in (0, 1)]
        if s % H:
            for r in (0, 1):
                assert torch.allclose(b[r], (prev[r] - now[r]) / lr, rtol=0, atol=1e-12), (s, r)
        else:
            assert torch.allclose(b[0] + b[1], (prev[0] + prev[1] - now[0] - now[1]) / lr, rtol=0, atol=1e-12), s
        assert not torch.equal(b[0], b[1])  # each rank's own buffer, not one copied to both

    # resuming mid-period (step 4) or at a sync (step 6) continues exactly as the uninterrupted run
    for s in (4, 6):
        for r in (r0, r1):
            resumed = r[f"resumed_{s}"]["after"]
            assert resumed.shape[0] == steps - s
            assert (resumed - r["full"]["after"][s:]).abs().max() <= 1e-9, s

    # the same with the bf16 transport, whose fp32 anchor travels in the checkpoint
    for r in (r0, r1):
        assert not torch.equal(r["bf16_full"]["after"], r["full"]["after"])  # bf16 really was on the wire
        assert (r["bf16_resumed_4"]["after"] - r["bf16_full"]["after"][4:]).abs().max() <= 1e-9

    # after fit every rank holds the same model: the average of the last replicas
    final_mean = (pre_final(full[0]) + pre_final(full[1])) / 2
    assert torch.equal(r0["full"]["final"], r1["full"]["final"])
    assert (r0["full"]["final"] - final_mean).abs().max() <= 1e-12


def pre_final(run: dict) -> torch.Tensor:
    return run["after"][-1]
