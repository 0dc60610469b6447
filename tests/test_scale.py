"""bench.scale: the production stages measured at a size, the ratios it reports, the figures
`nearid plan` takes from it, and the streamed extraction input that keeps the driver flat."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from nearid.schema import DISTRACTORS, MTG, POSITIVES
from nearid.io.storage import Storage

pytestmark = pytest.mark.timeout(600)


def _write(storage, spec, rows: list[dict]) -> None:
    storage.write_table(spec, pa.Table.from_pylist(rows, schema=spec.schema))


@pytest.fixture
def three_sources(tmp_path):
    st = Storage.open(str(tmp_path / "root"))
    ids = [f"id{i:03d}" for i in range(40)]
    split = {i: ("train" if n % 4 else "test") for n, i in enumerate(ids)}
    _write(st, POSITIVES, [{"id": i, "view": v, "split": split[i], "image": f"p{i}{v}".encode()}
                           for i in ids for v in range(3)])
    _write(st, DISTRACTORS, [{"id": i, "view": v, "setting": s, "split": split[i], "image": f"{s}{i}{v}".encode(),
                              "status": "ok" if (v, s) != (2, "b") else "rejected"}
                             for i in ids for v in range(3) for s in ("a", "b")])
    _write(st, MTG, [{"id": f"m{k}", "split": "test", "image_1": b"1", "image_2": b"2", "image_1p": b"3",
                      "image_2p": b"4"} for k in range(5)])
    return st


def test_streamed_image_rows_equal_the_whole_table_read(three_sources):
    from nearid.sources import IMAGE_ROWS, image_rows, scan

    for src, n in (("positive", 120), ("a", 120), ("b", 80), ("mtg", 20)):
        whole = image_rows(three_sources, src)
        pieces = list(scan(three_sources, src, batch_rows=7))
        assert whole.num_rows == n and whole.schema.equals(IMAGE_ROWS)
        assert max(p.num_rows for p in pieces) <= 7 * (4 if src == "mtg" else 1)
        key = lambda t: sorted(zip(*(t[c].to_pylist() for c in ("id", "view", "source", "split", "image"))))  # noqa: E731
        assert key(pa.concat_tables(pieces)) == key(whole)
        keys_only = pa.concat_tables(list(scan(three_sources, src, with_image=False, batch_rows=7)))
        assert "image" not in keys_only.column_names and keys_only.num_rows == n
    test_only = image_rows(three_sources, "positive", splits=["test"])
    assert set(test_only["split"].to_pylist()) == {"test"} and test_only.num_rows == 30


def test_pending_chunks_are_exact_and_skip_what_is_done(three_sources):
    from nearid.stages.extract import _pending_chunks

    done = {(f"id{i:03d}", v, "positive") for i in range(10) for v in range(3)} | {("m0", 0, "mtg")}
    chunks = list(_pending_chunks(three_sources, ["positive", "a", "mtg"], None, done, chunk_rows=50))
    sizes = [c.num_rows for c in chunks]
    assert sizes == [50] * (len(sizes) - 1) + [sizes[-1]] and sum(sizes) == 120 - 30 + 120 + 20 - 1
    keys = [k for c in chunks for k in zip(c["id"].to_pylist(), c["view"].to_pylist(), c["source"].to_pylist())]
    assert len(keys) == len(set(keys)) and not set(keys) & done
    assert [c["source"][0].as_py() for c in chunks][0] == "positive" and chunks[-1]["source"][-1].as_py() == "mtg"


def test_summary_ratios_and_marginal_costs_known_answer():
    from bench.scale import summarise

    def size(rows, items, ext, train, rss):
        return {"rows": rows, "items": items, "seconds": ext + train, "seconds_per_1k_rows": 1000 * (ext + train) / rows,
                "stages": {"extract": ext, "train": train}, "peak_rss_mb": rss, "spilled_mb": 0.0}

    out = summarise([size(1000, 60, 10.0, 30.0, 500.0), size(4000, 240, 16.0, 33.0, 520.0),
                     size(16000, 960, 40.0, 45.0, 600.0)])
    assert out["per_row_time"] == pytest.approx((85 / 16) / 40, abs=1e-3)
    assert out["peak_rss"] == pytest.approx(1.2) and out["rows"] == 16.0 and out["spilled_mb"] == 0
    assert out["marginal_seconds_per_1k_rows"] == pytest.approx(1000 * 36 / 12000, abs=1e-3)
    assert out["marginal_extract_s_per_image"] == pytest.approx(24 / 12000, abs=1e-6)
    assert out["marginal_train_s_per_item"] == pytest.approx(12 / 720, abs=1e-6)


@pytest.mark.slow
def test_one_size_through_the_production_stages(ray_local, tmp_path, monkeypatch):
    from bench.scale import N_MTG, ROWS_PER_IDENTITY, measure, set_up

    rows, root, extra = 480, tmp_path / "rows_480", ["train.batch_size=16"]
    set_up(ray_local, rows, root, extra)
    res = measure(ray_local, rows, root, extra)
    ids, st = res["identities"], Storage.open(str(root))
    n_mtg = st.read_table("mtg", columns=["id"]).num_rows
    assert ids == rows // ROWS_PER_IDENTITY and n_mtg >= N_MTG
    assert res["rows"] == ids * ROWS_PER_IDENTITY + 4 * n_mtg      # every image of every source, once
    assert res["items"] == res["train_identities"] and res["items_per_train_identity"] == 1.0
    assert res["train_steps"] >= res["items"] // 16 >= 1
    assert set(res["stages"]) == {"extract", "train", "evaluate"} and res["seconds"] == pytest.approx(
        sum(res["stages"].values()), abs=0.05)
    assert 0 < res["rss_at_start_mb"] <= res["peak_rss_mb"] and res["worker_peak_rss_mb"] > 0
    assert res["spilled_mb"] == 0
    # 16 tokens x 32 dims of fp16 per row: Parquet stores about the 2 bytes a value takes
    assert 1.9 <= res["token_bytes_per_value"] <= 3.0 and res["other_bytes_per_row"] > 0
    assert set(res["test_ssr"]) == {"frozen:mean", "nearid"}

    # nearid plan takes its CPU, bytes and items figures from what bench.scale wrote
    from nearid.config import load_config
    from nearid.plan import plan, scale_figures
    from tests.test_cli import ROOT

    big = dict(res, rows=4 * res["rows"])
    scale = tmp_path / "scale.json"
    scale.write_text(json.dumps({"sizes": [res, big], "ratios": {
        "marginal_extract_s_per_image": 0.002, "marginal_train_s_per_item": 0.01}}))
    monkeypatch.setenv("NEARID_SCALE", str(scale))
    monkeypatch.setenv("NEARID_GPU_CHECK", str(tmp_path / "none.json"))
    fig = scale_figures()
    assert fig["cpu_s_per_image"] == pytest.approx(0.002 * res["cpus"])
    p = plan(load_config(ROOT / "configs/paper.yaml"), 2.0)
    T, D = p["token_shape"]
    ex = next(line for line in p["lines"] if line.stage.startswith("extract ("))
    assert p["token_cache_bytes"] == int(ex.images * (T * D * res["token_bytes_per_value"] + res["other_bytes_per_row"]))
    cpu = next(line for line in p["lines"] if line.stage.startswith("extract, CPU side"))
    assert cpu.cpu_hours == pytest.approx(ex.images * 0.002 * res["cpus"] / 3600) and "bench.scale" in cpu.source
    assert p["cores_per_gpu"] == pytest.approx(700.0 * 0.002 * res["cpus"])
