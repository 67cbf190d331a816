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
    names = [n for n in r0["checkpoints"][4]["state_dict"]]
    for s in (3, 4, 6):
        ckpt = r0["checkpoints"][s]
        saved = torch.cat([ckpt["state_dict"][n].reshape(-1) for n in names])
        mean = (full[0]["after"][s - 1] + full[1]["after"][s - 1]) / 2
        assert (saved - mean).abs().max() <= 1e-12
        for rank in (0, 1):
            replica = ckpt["localsgd"]["ranks"][rank]["model"]
            assert torch.equal(torch.cat([replica[n].reshape(-1) for n in names]), full[rank]["after"][s - 1])
        momentum = ckpt["localsgd"]["ranks"][1]["optimizer_states"][0]["state"][0]["momentum_buffer"]
        assert momentum.abs().sum() > 0

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
