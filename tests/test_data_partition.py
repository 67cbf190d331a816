"""The partitioners of recipes.partition against literal and closed-form expectations."""

import numpy as np
import pytest

from recipes.partition import (
    class_assignment,
    dirichlet_proportions,
    equalize,
    partition,
    partition_classes,
    partition_dirichlet,
    partition_iid,
)

# 10 classes of unequal sizes: class c has 10 + c samples (145 in all), in a scrambled order.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), np.arange(10) + 10))


def test_iid_sizes_disjoint_and_seeded():
    parts = partition_iid(LABELS, 4, seed=7)
    assert [len(p) for p in parts] == [36, 36, 36, 36]  # 145 // 4, remainder of 1 dropped
    union = np.concatenate(parts)
    assert len(np.unique(union)) == 144
    perm = np.random.default_rng(7).permutation(145)
    np.testing.assert_array_equal(parts[2], perm[72:108])
    assert not np.array_equal(partition_iid(LABELS, 4, seed=8)[0], parts[0])


def test_class_assignment_literal():
    assert class_assignment(10, 2, 5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert class_assignment(10, 4, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]
    with pytest.raises(ValueError, match="classes_per_rank"):
        class_assignment(10, 2, 11)


def test_classes_per_rank_label_sets_and_counts():
    parts = partition_classes(LABELS, 4, classes_per_rank=3, seed=0)
    assert [sorted(set(LABELS[p].tolist())) for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 9]]
    # class 0 (10 samples) is shared by ranks 0 and 3, class 1 (11 samples) too: array_split gives 6/5
    assert (LABELS[parts[0]] == 0).sum() == 5 and (LABELS[parts[3]] == 0).sum() == 5
    assert (LABELS[parts[0]] == 1).sum() == 6 and (LABELS[parts[3]] == 1).sum() == 5
    assert (LABELS[parts[1]] == 4).sum() == 14  # unshared class: all of it
    assert len(np.unique(np.concatenate(parts))) == 145  # every sample exactly once
    assert sum(len(p) for p in parts) == 145


def test_classes_per_rank_warns_about_unseen_classes():
    with pytest.warns(UserWarning, match="unseen"):
        partition_classes(LABELS, 2, classes_per_rank=2)


def test_dirichlet_counts_follow_the_proportions():
    alpha, world, seed = 0.3, 3, 5
    parts = partition_dirichlet(LABELS, world, alpha, seed)
    props = np.random.default_rng(seed).dirichlet([alpha] * world, size=10)
    np.testing.assert_allclose(props, dirichlet_proportions(10, world, alpha, seed))
    np.testing.assert_allclose(props.sum(1), 1.0)
    for c in range(10):
        n = 10 + c
        cuts = np.floor(np.cumsum(props[c])[:-1] * n).astype(int)
        expected = np.diff(np.concatenate([[0], cuts, [n]]))
        got = [(LABELS[p] == c).sum() for p in parts]
        assert got == expected.tolist(), c
    assert len(np.unique(np.concatenate(parts))) == 145
    again = partition_dirichlet(LABELS, world, alpha, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_dirichlet(LABELS, world, alpha, seed + 1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_large_alpha_is_close_to_iid():
    labels = np.repeat(np.arange(10), 1000)
    parts = partition_dirichlet(labels, 2, alpha=1e4, seed=0)
    shares = np.array([[(labels[p] == c).mean() for c in range(10)] for p in parts])
    np.testing.assert_allclose(shares, 0.1, atol=0.01)


def test_equalize_truncates_and_pads_from_own_shard():
    parts = [np.arange(0, 10), np.arange(100, 103)]
    a, b = equalize(parts, 6, seed=0)
    assert len(a) == len(b) == 6
    assert len(set(a.tolist())) == 6 and set(a.tolist()) <= set(range(10))  # a random subset, no repeats
    assert b[:3].tolist() == [100, 101, 102] and set(b.tolist()) == {100, 101, 102}  # padded by resampling itself
    with pytest.raises(ValueError, match="rank 1 received no samples"):
        equalize([np.arange(3), np.empty(0, dtype=int)], 2)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "classes"])
def test_every_rank_gets_the_same_number_of_samples(scheme):
    parts = partition(LABELS, 4, scheme, alpha=0.5, classes_per_rank=3, seed=1)
    assert [len(p) for p in parts] == [36] * 4
    again = partition(LABELS, 4, scheme, alpha=0.5, classes_per_rank=3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))


def test_bad_scheme_names_the_choices():
    with pytest.raises(ValueError, match="iid"):
        partition(LABELS, 2, "shards")
