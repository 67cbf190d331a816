"""Overlapped and fragmented syncs (PeriodicAveraging, DiLoCo): literal numbers with the fake transport."""

import pytest
import torch

from lightning_localsgd import DiLoCo, ElasticAveraging, LeaderSGD, ModifiedLocalGD, PeriodicAveraging
from lightning_localsgd.transport.tensors import partition
from tests.fakes import FakeCollectives, Toy, bind_fake

F64 = torch.float64
SENT, OTHER = [0.8, 2.2, 0.4], [0.6, 1.8, 0.2]  # this rank's and the other rank's values at the sync step
MEAN = [0.7, 2.0, 0.3]
LATER = [0.9, 2.1, 0.6]  # this rank one local step later: progress [0.1, −0.1, 0.2]


def start_sync_then_step(algorithm, comm_dtype=None):
    """Sync due at step 2 starts in the background; one more local step; it lands at step 3."""
    module, comm = Toy(), FakeCollectives(comm_dtype)
    bind_fake(algorithm, module, comm)
    algorithm.after_step(1)
    module.set_(SENT)
    comm.other = torch.tensor(OTHER, dtype=F64)
    algorithm.after_step(2)
    assert torch.equal(module.flat(), torch.tensor(SENT, dtype=F64))  # nothing merged yet: training goes on
    module.set_(LATER)
    algorithm.after_step(3)
    return module, comm


def close(module, expected):
    torch.testing.assert_close(module.flat(), torch.tensor(expected, dtype=F64), rtol=0, atol=1e-15)


def test_overlapped_average_keeps_the_local_progress_of_the_overlap():
    alg = PeriodicAveraging(sync_every=2, overlap_steps=1)
    module, comm = start_sync_then_step(alg)
    # x ← x + (mean − sent) = [0.9, 2.1, 0.6] + ([0.7, 2.0, 0.3] − [0.8, 2.2, 0.4])
    close(module, [0.8, 1.9, 0.5])
    assert len(comm.sent) == 1 and torch.equal(comm.sent[0][:3], torch.tensor(SENT, dtype=F64))
    assert alg.num_syncs == 1 and not alg.is_synced(3)  # the replicas differ by their progress


def test_merge_alpha_is_torchfts_mix_of_consensus_and_replica():
    module, _ = start_sync_then_step(PeriodicAveraging(sync_every=2, overlap_steps=1, merge_alpha=0.5))
    close(module, [0.8, 2.05, 0.45])  # 0.5·mean + 0.5·[0.9, 2.1, 0.6]
    module, _ = start_sync_then_step(PeriodicAveraging(sync_every=2, overlap_steps=1, merge_alpha=0.0))
    close(module, MEAN)  # α = 0: the consensus, the overlap's steps dropped


def test_overlapped_diloco_merges_the_outer_step():
    alg = DiLoCo(sync_every=2, overlap_steps=1)
    module, _ = start_sync_then_step(alg)
    # θ' = θ − 0.7·(1 + 0.9)·Δ with Δ = [1, 2, 0.5] − mean = [0.3, 0, 0.2]  →  [0.601, 2.0, 0.234]
    torch.testing.assert_close(alg.anchor, torch.tensor([0.601, 2.0, 0.234], dtype=F64), rtol=0, atol=1e-15)
    close(module, [0.701, 1.9, 0.434])  # x + (θ' − sent)


def test_fragments_sync_at_staggered_steps_each_with_its_own_outer_optimizer():
    alg = DiLoCo(sync_every=2, fragments=2, outer_lr=1.0, outer_momentum=0.5, nesterov=False)
    module, comm = Toy(), FakeCollectives()
    bind_fake(alg, module, comm)
    assert [(f.offset, f.numel) for f in alg._fragments] == [(0, 1), (1, 2)]
    assert len(alg.outers) == 2 and all(o is not alg.outers[0] for o in alg.outers[1:])
    module.set_(SENT)
    comm.other = torch.tensor(OTHER[:1], dtype=F64)
    alg.after_step(1)  # fragment 0 (w[0]) at offset ⌊1·2/2⌋ = 1: θ₀ ← 1 − (1 − 0.7) = 0.7
    close(module, [0.7, 2.2, 0.4])
    assert comm.sent[-1].numel() == 1 + 2  # one value and a flag per rank: half the model's bytes
    comm.other = torch.tensor(OTHER[1:], dtype=F64)
    alg.after_step(2)  # fragment 1 (w[1], b) at offset 2: θ₁ ← [2, 0.5] − ([2, 0.5] − [2.0, 0.3])
    close(module, [0.7, 2.0, 0.3])
    module.set_([0.5, 2.0, 0.3])
    comm.other = torch.tensor([0.5], dtype=F64)
    alg.after_step(3)  # fragment 0 again: Δ = 0.7 − 0.5 = 0.2, momentum buffer 0.5·0.3 + 0.2 = 0.35
    close(module, [0.35, 2.0, 0.3])
    assert alg.outers[0].state_dict()["state"][0]["momentum_buffer"].tolist() == pytest.approx([0.35])
    assert alg.outers[1].state_dict()["state"][0]["momentum_buffer"].tolist() == pytest.approx([0.0])


def test_partition_cuts_the_flat_layout_into_equal_ranges_across_tensor_boundaries():
    tensors = [torch.zeros(n) for n in (10, 1, 1, 30, 5, 5, 40, 8)]
    parts = partition(tensors, 3)
    assert [(f.offset, f.numel) for f in parts] == [(0, 33), (33, 33), (66, 34)]
    assert parts[1].spans == ((3, 21, 30), (4, 0, 5), (5, 0, 5), (6, 0, 14))
    assert [t.shape for t in parts[1].tensors(tensors)] == [(9,), (5,), (5,), (14,)]
    assert parts[1].tensors(tensors)[1] is tensors[4]  # whole tensors are passed as they are
    assert max(f.numel for f in partition(tensors, 4)) == 25  # ⌈100/4⌉


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PeriodicAveraging(8, overlap_steps=8), r"overlap_steps=8 must be smaller than sync_every=8.*<= 7"),
        (lambda: DiLoCo(8, overlap_steps=-1), "overlap_steps must be an integer >= 0"),
        (lambda: PeriodicAveraging(8, fragments=0), "fragments must be an integer >= 1"),
        (lambda: DiLoCo(4, fragments=5), r"fragments=5 needs sync_every >= 5"),
        (lambda: PeriodicAveraging(8, merge_alpha=0.5), "merge_alpha has no effect without overlap_steps > 0"),
        (
            lambda: PeriodicAveraging(8, overlap_steps=2, merge_alpha=1.5),
            r"merge_alpha must be a number in \[0, 1\]",
        ),
        (lambda: ModifiedLocalGD(8, 0.1, overlap_steps=2), "ModifiedLocalGD cannot overlap or fragment"),
        (lambda: ElasticAveraging(8, fragments=2), "use PeriodicAveraging or DiLoCo"),
        (lambda: LeaderSGD(8, overlap_steps=1), "LeaderSGD cannot overlap"),
        (lambda: PeriodicAveraging(8, node_sync_every=4, overlap_steps=2), "hierarchical averaging.*blocking"),
    ],
)
def test_bad_overlap_and_fragment_arguments_name_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_more_fragments_than_values_is_refused_when_the_model_is_known():
    with pytest.raises(ValueError, match="fragments=4 but the model synchronizes only 3 values"):
        bind_fake(PeriodicAveraging(4, fragments=4), Toy(), FakeCollectives())
