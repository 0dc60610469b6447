import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from nearid.config import StorageConfig
from nearid.schema import (POSITIVES, TABLES, column_to_numpy, embedding_column, features_schema,
                           tensor_column)
from nearid.io.storage import Storage, StorageError


def _positives(n=4, split="train"):
    return pa.Table.from_pylist([
        {"id": f"x{i}", "view": i % 3, "split": split if i % 2 else "test", "category": "mug",
         "description": "a red mug", "prompt": "a photo of a red mug", "image": bytes([i]) * 5,
         "mask": b"m"} for i in range(n)], schema=POSITIVES.schema)


def _features(n=3, T=4, D=5):
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((n, T, D)).astype(np.float16)
    emb = rng.standard_normal((n, D)).astype(np.float32)
    t = pa.table({"id": [f"x{i}" for i in range(n)], "view": pa.array([0, 1, 2][:n], pa.int8()),
                  "source": ["positive"] * n, "split": ["train"] * n,
                  "tokens": tensor_column(tokens), "embedding": embedding_column(emb)})
    return t, tokens, emb


def _roundtrip(storage):
    storage.write_table(POSITIVES, _positives())
    back = storage.read_table(POSITIVES).sort_by([("id", "ascending")])
    assert back.num_rows == 4
    assert back["split"].to_pylist() == ["test", "train", "test", "train"]
    assert back["image"].to_pylist()[1] == bytes([1]) * 5
    assert storage.keys("positives", ["id", "view"]) == {("x0", 0), ("x1", 1), ("x2", 2), ("x3", 0)}
    t, tokens, emb = _features()
    storage.write_table("features", t, ["source"])
    f = storage.read_table("features")
    assert np.array_equal(column_to_numpy(f["tokens"]), tokens)
    assert np.allclose(column_to_numpy(f["embedding"]), emb)


def test_local_roundtrip_and_plain_pyarrow(tmp_path):
    storage = Storage.open(str(tmp_path / "root"))
    _roundtrip(storage)
    # a user with plain pyarrow (no Ray, no nearid) reads the tensor column back with its shape
    ds = pads.dataset(str(tmp_path / "root" / "features"), format="parquet", partitioning="hive")
    col = ds.to_table()["tokens"].combine_chunks()
    assert col.to_numpy_ndarray().shape == (3, 4, 5)


def test_s3_roundtrip(s3_server):
    endpoint, bucket = s3_server
    storage = Storage.open(f"s3://{bucket}/roundtrip", StorageConfig(endpoint_url=endpoint))
    storage.check()
    _roundtrip(storage)
    assert storage.is_done("positives") is False
    storage.mark_done("positives", {"rows": 4})
    assert storage.read_json("positives/_SUCCESS.json") == {"rows": 4}


def test_unreachable_s3_fails_fast_with_endpoint_named():
    storage = Storage.open("s3://nobucket/x", StorageConfig(endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StorageError, match="127.0.0.1:9"):
        storage.check()


def test_interrupted_write_leaves_nothing_visible(tmp_path, monkeypatch):
    storage = Storage.open(str(tmp_path))
    storage.write_table(POSITIVES, _positives(2))
    calls = {"n": 0}
    real = pq.write_table

    def crash_on_second_file(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-write")
        return real(*a, **k)

    monkeypatch.setattr(pq, "write_table", crash_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        storage.write_table(POSITIVES, _positives(6))   # two partitions -> two files
    monkeypatch.undo()
    assert storage.read_table(POSITIVES).num_rows == 2       # none of the failed write is visible
    assert not list((tmp_path / "positives" / "_staging").glob("*"))


def test_partial_file_in_staging_is_invisible(tmp_path):
    storage = Storage.open(str(tmp_path))
    storage.write_table(POSITIVES, _positives(2))
    write_id, stage = storage.staging_dir("positives")
    (tmp_path / "positives" / "_staging" / write_id / "half.parquet").write_bytes(b"PAR1garbage")
    assert storage.read_table(POSITIVES).num_rows == 2


def test_partition_value_and_missing_table_errors(tmp_path):
    storage = Storage.open(str(tmp_path))
    bad = _positives(1).set_column(2, "split", pa.array(["a/b"]))
    with pytest.raises(ValueError, match="partition column 'split'"):
        storage.write_table(POSITIVES, bad)
    with pytest.raises(FileNotFoundError, match="table 'distractors' not found"):
        storage.read_table("distractors")


def test_schema_module_owns_every_table():
    assert {"positives", "distractors", "features", "sims", "rejects"} <= set(TABLES)
    s = features_schema(729, 1152, 1152)
    assert s.field("tokens").type.shape == [729, 1152]
    assert s.field("embedding").type.list_size == 1152
