"""Issue 33 item 2c: one training batch built by hand through the production path (items ->
`draw_batch` -> `TokenSource`), every slot checked: the anchor is a positive view, the positives
are the identity's other views, distractor k is the look-alike in view k's background, and the
ranking pool is every other sample's positives (the reference's global pool, `training/losses.py`)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from nearid.losses import build_loss
from nearid.losses.core import _prepare
from nearid.training.items import N_VIEWS, group_items, item_sources
from nearid.training.loop import TokenSource, _to_numpy

SETTINGS = ["flux", "sdxl"]
T, D = 2, 4


def _code(identity: int, source: int, view: int) -> float:
    return 100.0 * identity + 10.0 * source + view


def _batch(n_ids: int = 5) -> dict:
    """Feature rows whose every token value encodes (identity, source, view); identity 3 has no
    sdxl look-alike for view 1 (a missing distractor)."""
    sources = item_sources(SETTINGS)[:-1]   # positive + settings (no MTG rows here)
    rows = []
    for i in range(n_ids):
        for s, src in enumerate(sources):
            for v in range(N_VIEWS):
                if (i, src, v) == (3, "sdxl", 1):
                    continue
                rows.append({"id": f"id{i}", "view": v, "source": src, "split": "train",
                             "tokens": [_code(i, s, v)] * (T * D)})
    t = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("view", pa.int8()),
                                                     ("source", pa.string()), ("split", pa.string()),
                                                     ("tokens", pa.list_(pa.float16(), T * D))]))
    items = group_items(t, item_sources(SETTINGS), "tokens", (T, D))
    return _to_numpy(items, "tokens", D)


def test_every_slot_of_a_hand_built_batch():
    from nearid.training.items import draw_batch

    batch = _batch()
    valid = batch["valid"].astype(bool)
    anchor, pos, pos_mask, neg, neg_mask = draw_batch(batch["id"], valid, seed=0, epoch=0, n_pos=2, n_neg=3)
    index = np.concatenate([anchor[:, None], pos, neg], axis=1)
    tok = TokenSource("tokens", None, "cpu")(batch, index)          # [B, 1 + P + K, T, D]
    code = tok[:, :, 0, 0].numpy()
    for b, id_ in enumerate(batch["id"]):
        i = int(id_.removeprefix("id"))
        a = int(round(code[b, 0])) % 10
        assert code[b, 0] == _code(i, 0, a), "the anchor is a positive view of its identity"
        assert sorted(int(round(c)) % 10 for c in code[b, 1:3]) == sorted(set(range(3)) - {a})
        assert all(int(round(c)) // 100 == i and int(round(c)) // 10 % 10 == 0 for c in code[b, 1:3])
        for k in range(3):
            c = int(round(code[b, 3 + k]))
            assert neg_mask[b, k]
            assert c // 100 == i and c % 10 == k, f"distractor slot {k} must sit in view {k}'s background"
            assert c // 10 % 10 in (1, 2), "a distractor comes from a setting, never the positives"
            if i == 3 and k == 1:
                assert c // 10 % 10 == 1, "the missing sdxl view-1 look-alike is never drawn"
        assert (neg[b] % N_VIEWS == np.arange(3)).all()
        assert (neg[b] % N_VIEWS == anchor[b]).sum() == 1, "exactly one distractor shares the anchor's background"


def test_the_ranking_pool_is_every_other_samples_positives():
    batch = _batch()
    valid = batch["valid"].astype(bool)
    from nearid.training.items import draw_batch

    anchor, pos, pos_mask, neg, neg_mask = draw_batch(batch["id"], valid, 0, 0, 2, 3)
    B = len(batch["id"])
    emb = torch.randn(B, 6, 8, generator=torch.Generator().manual_seed(0))
    prep = _prepare(emb[:, 0], emb[:, 1:3], emb[:, 3:], torch.as_tensor(pos_mask), torch.as_tensor(neg_mask),
                    gather=True)
    assert prep.pool.shape[0] == B * 2
    own = prep.own_in_pool.numpy()
    for b in range(B):
        assert own[b].sum() == 2 and own[b, 2 * b:2 * b + 2].all()
    # the ranking term's LSE runs over exactly the other 2(B-1) pool rows
    loss = build_loss("nearid", temperature=0.1, alpha=1.0)
    out = loss(emb[:, 0], emb[:, 1:3], emb[:, 3:], torch.as_tensor(pos_mask), torch.as_tensor(neg_mask))
    a = torch.nn.functional.normalize(emb[:, 0], dim=-1)
    p = torch.nn.functional.normalize(emb[:, 1:3], dim=-1).reshape(-1, 8)
    n = torch.nn.functional.normalize(emb[:, 3:], dim=-1)
    lse = torch.stack([torch.logsumexp(torch.cat([a[b] @ p[:2 * b].T, a[b] @ p[2 * b + 2:].T]) / 0.1, 0)
                       for b in range(B)])
    ranking = torch.nn.functional.softplus(lse[:, None] - torch.einsum("bd,bkd->bk", a, n) / 0.1).mean()
    assert abs(out.terms["ranking"] - float(ranking)) < 1e-5
