"""The schema module's encodings: tokens flattened for items and back, items tables match their
spec, and the evaluate stage's `sims` tables carry the `SIMS` columns."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from nearid.schema import (ITEMS, SIMS, TABLES, flatten_tokens, items_schema, items_table, tensor_column,
                           unflatten_tokens)
from nearid.stages.evaluate import sims_arrow, sims_table
from nearid.training.items import N_VIEWS, group_items, item_sources


def test_tokens_flatten_and_unflatten_are_inverse():
    tok = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float16)
    col = tensor_column(tok)
    chunked = pa.chunked_array([col.slice(0, 2), col.slice(2, 0), col.slice(2)])   # an empty chunk
    plain = flatten_tokens(chunked)
    assert plain.type == pa.list_(pa.float16(), 12) and plain.num_chunks == 2
    assert np.array_equal(unflatten_tokens(plain, (4, 3)), tok)
    assert np.array_equal(unflatten_tokens(chunked), tok)             # the tensor encoding reads too
    assert flatten_tokens(plain) is plain
    assert np.array_equal(unflatten_tokens(flatten_tokens(tok), (-1, 3)), tok)


def test_group_items_writes_the_items_spec():
    settings = ["flux"]
    sources = item_sources(settings)
    tok = np.arange(2 * 3 * 2 * 4, dtype=np.float16).reshape(6, 2, 4)   # 6 rows of [T=2, D=4]
    rows = pa.table({"id": ["a", "a", "a", "b", "a", "b"], "view": pa.array([0, 1, 2, 0, 0, 1], pa.int8()),
                     "source": ["positive"] * 4 + ["flux", "flux"], "split": ["train"] * 6,
                     "tokens": flatten_tokens(tensor_column(tok))})
    items = group_items(rows, sources, "tokens", (2, 4))
    n_slots = len(sources) * N_VIEWS
    assert items.schema == items_schema("tokens", n_slots, n_slots * 2 * 4)
    assert items.schema.names[:3] == ITEMS.schema.names[:3] and TABLES["items"] is ITEMS
    back = unflatten_tokens(items["tokens"], (n_slots, -1, 4))
    assert np.array_equal(back[0, 1], tok[1]) and np.array_equal(back[1, N_VIEWS + 1], tok[5])
    assert not back[1, 1].any()                                        # b has no positive view 1
    assert items_table("tokens", "train") == "items_tokens_train"


def test_sims_tables_carry_the_sims_columns_in_build_order():
    sims = pd.DataFrame({"id": ["a", "b"], "setting": ["flux", "flux"], "sim_01": [0.5, np.nan],
                         "sim_02": [0.1, 0.2], "sim_12": [0.3, 0.4], "cross_00": [0.2, 0.2],
                         "cross_11": [np.nan, 0.1], "cross_22": [0.0, 0.3], "split": ["test", "test"]})
    t = sims_arrow(sims)
    plain = pa.Table.from_pandas(sims, preserve_index=False)
    assert t.equals(plain) and t.schema.metadata == plain.schema.metadata   # what was written before
    assert set(SIMS.schema.names) == set(t.schema.names)
    bad = sims.assign(sim_01=["x", "y"])
    with pytest.raises(ValueError, match="sim_01"):
        sims_arrow(bad)
    with pytest.raises(ValueError, match="cross_22"):
        sims_arrow(sims.drop(columns=["cross_22"]))
    assert sims_table("nearid:runs/x/models/y") == "sims_nearid_runs_x_models_y"
