"""The training sampler: independent data orders per (seed, epoch), ranks that partition every
global batch, and a resumed run that replays the same order."""
from __future__ import annotations

import itertools

import pytest

from pipeline.train.data import GlobalBatchSampler, epoch_order, split_sizes


def test_no_two_seed_epoch_pairs_draw_the_same_order():
    n = 1000
    orders = {(s, e): tuple(epoch_order(n, s, e)) for s in range(4) for e in range(10)}
    assert len(set(orders.values())) == len(orders) == 40
    for o in orders.values():
        assert sorted(o) == list(range(n))
    # The old `seed + epoch` seeding made seed 1's epoch e seed 0's epoch e + 1: no longer.
    for s, e in itertools.product(range(3), range(9)):
        assert orders[(s + 1, e)] != orders[(s, e + 1)]
    # Not merely shifted or reversed either: two pairs share about 1/n of their positions.
    same = [sum(a == b for a, b in zip(orders[p], orders[q]))
            for p, q in itertools.combinations(orders, 2)]
    assert max(same) < 15 and sum(same) / len(same) < 2


@pytest.mark.parametrize("world", [1, 3, 7])
def test_ranks_partition_every_global_batch(world):
    n, batch = 203, 32
    ranks = [GlobalBatchSampler(n, batch, world, r, seed=2) for r in range(world)]
    for epoch in (0, 5):
        for s in ranks:
            s.set_epoch(epoch)
        steps = [list(s) for s in ranks]
        assert len({len(st) for st in steps}) == 1 and len(steps[0]) == n // batch
        for i, global_batch in enumerate(ranks[0].global_batches()):
            parts = [steps[r][i] for r in range(world)]
            assert [len(p) for p in parts] == split_sizes(batch, world)
            assert [j for p in parts for j in p] == global_batch          # in order, no overlap
        assert [j for b in ranks[0].global_batches() for j in b] == epoch_order(n, 2, epoch)[
            :n // batch * batch]


def test_a_resumed_run_replays_the_same_order():
    """A run stopped after epoch 3 and resumed in a fresh process (a new sampler, set_epoch(4))
    sees what the uninterrupted run saw."""
    straight = GlobalBatchSampler(100, 16, 2, 1, seed=3)
    seen = {}
    for epoch in range(6):
        straight.set_epoch(epoch)
        seen[epoch] = list(straight)
    resumed = GlobalBatchSampler(100, 16, 2, 1, seed=3)
    for epoch in (4, 5):
        resumed.set_epoch(epoch)
        assert list(resumed) == seen[epoch]
    assert seen[4] != seen[5]
