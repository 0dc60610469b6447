"""Which items share a batch: MTG copies apart, MTG and NearID mixed, a new order every epoch.

The measure (`batch_stats`) is checked against the order the items table used to be read in
(Ray's groupby output: each partition sorted by id, MTG copies adjacent, 'mtg:' before
'nearid-'), so the test fails on the old order and passes on the new one.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from nearid.training.items import batches_in_epoch_order, copy_base, epoch_order, group_key


def mixed_ids(n_nearid: int, n_mtg: int, repeat: int) -> list[str]:
    return [f"nearid-{i:06d}" for i in range(n_nearid)] + \
        [f"mtg:m{i:04d}" + ("" if r == 0 else f"#{r}") for i in range(n_mtg) for r in range(repeat)]


def batch_stats(ordered: list[str], batch: int) -> dict:
    """Share of all-MTG / all-NearID batches, and of MTG items sharing a batch with a copy."""
    n = len(ordered) // batch
    all_mtg = all_nearid = shared = n_mtg = 0
    for b in range(n):
        chunk = ordered[b * batch:(b + 1) * batch]
        mtg = [copy_base(i) for i in chunk if i.startswith("mtg:")]
        all_mtg += len(mtg) == batch
        all_nearid += not mtg
        shared += sum(c for c in Counter(mtg).values() if c > 1)
        n_mtg += len(mtg)
    return {"all_mtg": all_mtg / n, "all_nearid": all_nearid / n, "copies_together": shared / max(1, n_mtg)}


def old_groupby_order(ids: list[str], n_parts: int) -> list[str]:
    part = lambda i: int(hashlib.md5(copy_base(i).encode()).hexdigest(), 16) % n_parts  # noqa: E731
    return [i for p in range(n_parts) for i in sorted(x for x in ids if part(x) == p)]


def test_batch_composition_fails_on_the_old_order_and_passes_on_the_new():
    ids = mixed_ids(4000, 1000, 4)          # the paper's MTG share (~4.9K x 4 next to 18.8K)
    old = batch_stats(old_groupby_order(ids, 8), 128)
    assert old["all_mtg"] > 0.2 and old["copies_together"] > 0.5     # the measure sees the problem
    new = batch_stats([ids[i] for i in epoch_order(ids, 0, 0, 4, 128)], 128)
    assert new["all_mtg"] == 0 and new["all_nearid"] == 0
    assert new["copies_together"] == 0
    share = np.mean([i.startswith("mtg:") for i in ids])
    # every batch holds about the overall MTG share (binomial spread, 6 sigma)
    ordered = [ids[i] for i in epoch_order(ids, 0, 0, 4, 128)]
    per_batch = [np.mean([i.startswith("mtg:") for i in ordered[b * 128:(b + 1) * 128]])
                 for b in range(len(ordered) // 128)]
    assert max(abs(p - share) for p in per_batch) < 6 * np.sqrt(share * (1 - share) / 128)


def test_epoch_order_is_a_permutation_new_each_epoch_and_independent_of_arrival_order():
    ids = mixed_ids(300, 40, 4)
    o0 = epoch_order(ids, 7, 0, 4, 32)
    assert sorted(o0.tolist()) == list(range(len(ids)))
    o1 = epoch_order(ids, 7, 1, 4, 32)
    assert [ids[i] for i in o0] != [ids[i] for i in o1]                    # a fresh order each epoch
    rng = np.random.default_rng(0)
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    assert [shuffled[i] for i in epoch_order(shuffled, 7, 0, 4, 32)] == [ids[i] for i in o0]
    assert [ids[i] for i in epoch_order(ids, 8, 0, 4, 32)] != [ids[i] for i in o0]   # seed matters


def test_copies_stay_apart_when_the_batch_allows_only_just():
    # 3 samples x 4 copies in batches of 3: every batch must hold three different samples
    ids = mixed_ids(0, 3, 4)
    for epoch in range(20):
        s = batch_stats([ids[i] for i in epoch_order(ids, 0, epoch, 4, 3)], 3)
        assert s["copies_together"] == 0, epoch


@pytest.mark.parametrize("buffer_rows", [0, 64])
def test_streamed_batches_cover_the_epoch_once(buffer_rows):
    ids = sorted(mixed_ids(200, 30, 4), key=lambda i: group_key(i, 0))   # the stored order
    table = pa.table({"id": ids, "x": np.arange(len(ids))})
    stream = [table.slice(s, 37) for s in range(0, len(ids), 37)]        # arrives in odd-sized blocks
    out = list(batches_in_epoch_order(stream, 0, 0, 4, 16, buffer_rows))
    assert all(b.num_rows == 16 for b in out)
    seen = [i for b in out for i in b["id"].to_pylist()]
    assert len(seen) == len(set(seen))                                    # no item twice
    assert len(ids) - len(seen) < 16                                      # only the last partial batch is dropped
    together = batch_stats(seen, 16)["copies_together"]
    # a whole-epoch buffer separates every copy; a 64-row window only those inside the window
    assert together == 0 if buffer_rows == 0 else together < 0.1


def test_group_key_scatters_mtg_through_the_stored_order():
    ids = mixed_ids(500, 100, 4)
    stored = sorted(ids, key=lambda i: group_key(i, 0))                    # what groupby("gkey") writes
    first = stored[: len(stored) // 4]
    share = np.mean([i.startswith("mtg:") for i in ids])
    assert abs(np.mean([i.startswith("mtg:") for i in first]) - share) < 0.08
