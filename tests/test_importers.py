"""Importers from the public Hugging Face layouts: fixtures are written in exactly those layouts."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nearid.importers import (import_distractors, import_mtg, import_positives, main,
                              open_source, read_split_file, scan_stream)
from nearid.schema import DISTRACTORS, MTG, POSITIVES, REJECTS
from nearid.io.storage import Storage

CORRUPT = b"\x89PNG\r\n\x1a\nthis is not a png"
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rgb(seed: int, size: int = 16) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def grey_mask(seed: int) -> bytes:
    """Values 200 (object) and 100 (background) so the import must threshold at 127."""
    m = np.full((16, 16), 100, np.uint8)
    m[2 + seed % 4:10, 3:12] = 200
    return png(m)


def binary_of(mask_png: bytes) -> np.ndarray:
    return (np.asarray(Image.open(io.BytesIO(mask_png)).convert("L")) > 127).astype(np.uint8) * 255


def positive_row(i: int, views: int = 3) -> dict:
    row = {"category": "mug", "category_description": f"a mug number {i}", "n_images": views,
           "objaverse_id": f"obj{i}", "quality": 0.5 + i / 10}
    for j in (1, 2, 3):
        have = j <= views
        row[f"images{j}"] = rgb(10 * i + j) if have else None
        row[f"masks{j}"] = grey_mask(10 * i + j) if have else None
        row[f"prompts{j}"] = f"prompt {i}.{j}" if have else None
    return row


def write_layout(path, rows: list[dict], image_cols: list[str], struct: bool, extra=()) -> None:
    """Write `rows` in the public layout: image cells raw bytes, or HF's {bytes, path} struct."""
    columns = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if name in image_cols:
            if struct:
                values = [None if v is None else {"bytes": v, "path": None} for v in values]
                columns[name] = pa.array(values, HF_IMAGE)
            else:
                columns[name] = pa.array(values, pa.binary())
        else:
            columns[name] = pa.array(values)
    pq.write_table(pa.table(columns), path)


POS_IMAGES = [f"images{j}" for j in (1, 2, 3)] + [f"masks{j}" for j in (1, 2, 3)]


@pytest.fixture
def positives_dir(tmp_path):
    """4 identities in two HF-style shards: rows 0-1 raw bytes, rows 2-3 HF structs.

    Row 1's masks3 and row 3's images2 are corrupt; row 2 has only 2 views (images3 null).
    """
    rows = [positive_row(0), positive_row(1), positive_row(2, views=2), positive_row(3)]
    rows[1]["masks3"] = CORRUPT
    rows[3]["images2"] = CORRUPT
    d = tmp_path / "nearid"
    d.mkdir()
    write_layout(d / "train-00000-of-00002.parquet", rows[:2], POS_IMAGES, struct=False)
    write_layout(d / "train-00001-of-00002.parquet", rows[2:], POS_IMAGES, struct=True)
    return d, rows


@pytest.fixture
def split_dir(tmp_path):
    d = tmp_path / "splits"
    d.mkdir()
    (d / "train.json").write_text(json.dumps([0]))
    (d / "val.json").write_text(json.dumps({"indices": [1]}))
    (d / "test.json").write_text(json.dumps([3]))
    return d


def _splits(d):
    return {n: str(d / f"{n}.json") for n in ("train", "val", "test")}


def test_positives_long_format_ids_views_splits_bytes_rejects(tmp_path, positives_dir, split_dir):
    src, rows = positives_dir
    storage = Storage.open(str(tmp_path / "root"))
    counts = import_positives(str(src), storage, splits=_splits(split_dir))
    # 3 + 3 + 2 + 3 views present; row 1 view 2 (bad mask) and row 3 view 1 (bad image) rejected
    assert (counts["source_rows"], counts["input"], counts["written"], counts["rejected"],
            counts["empty_views"], counts["skipped"]) == (4, 11, 9, 2, 1, 0)
    assert counts["by_split"] == {"train": 5, "val": 2, "test": 2}

    t = storage.read_table(POSITIVES).sort_by([("id", "ascending"), ("view", "ascending")])
    keys = list(zip(t["id"].to_pylist(), t["view"].to_pylist()))
    assert keys == [("nearid-000000", 0), ("nearid-000000", 1), ("nearid-000000", 2),
                    ("nearid-000001", 0), ("nearid-000001", 1),
                    ("nearid-000002", 0), ("nearid-000002", 1),
                    ("nearid-000003", 0), ("nearid-000003", 2)]
    # row 2 is in no split file and the source has no split column -> "train"
    assert t["split"].to_pylist() == ["train"] * 3 + ["val"] * 2 + ["train"] * 2 + ["test"] * 2
    by_key = {(r["id"], r["view"]): r for r in t.to_pylist()}
    r = by_key[("nearid-000003", 2)]           # an HF-struct cell
    assert r["image"] == rows[3]["images3"]   # original encoded bytes kept
    assert r["prompt"] == "prompt 3.3" and r["description"] == "a mug number 3" and r["category"] == "mug"
    mask = Image.open(io.BytesIO(r["mask"]))
    assert mask.mode == "L" and set(np.unique(np.asarray(mask))) == {0, 255}
    assert np.array_equal(np.asarray(mask), binary_of(rows[3]["masks3"]))
    assert by_key[("nearid-000000", 1)]["image"] == rows[0]["images2"]

    rej = storage.read_table(REJECTS).sort_by("key").to_pylist()
    assert [(x["stage"], x["key"]) for x in rej] == [
        ("import", "table=positives/id=nearid-000001/view=2"),
        ("import", "table=positives/id=nearid-000003/view=1")]
    assert "masks3" in rej[0]["reason"] and "images2" in rej[1]["reason"]
    assert storage.is_done("positives")

    # a rerun imports nothing twice
    again = import_positives(str(src), storage, splits=_splits(split_dir))
    assert (again["input"], again["written"], again["rejected"], again["skipped"]) == (11, 0, 0, 11)
    assert storage.read_table(POSITIVES).num_rows == 9
    assert storage.read_table(REJECTS).num_rows == 2


def test_split_column_fills_rows_outside_split_files_and_limit(tmp_path):
    rows = [positive_row(i) for i in range(3)]
    for r, s in zip(rows, ["test", "val", None]):
        r["split"] = s
    write_layout(tmp_path / "p.parquet", rows, POS_IMAGES, struct=False)
    (tmp_path / "train.json").write_text("[0]")
    storage = Storage.open(str(tmp_path / "root"))
    counts = import_positives(str(tmp_path / "p.parquet"), storage, id_prefix="x-",
                              splits={"train": str(tmp_path / "train.json")}, limit=2)
    assert counts["source_rows"] == 2 and counts["written"] == 6
    t = storage.read_table(POSITIVES)
    got = dict(zip(t["id"].to_pylist(), t["split"].to_pylist()))
    assert got == {"x-000000": "train", "x-000001": "val"}   # file beats column; column beats default


def test_distractors_row_aligned_with_positives(tmp_path, positives_dir, split_dir):
    src, _ = positives_dir
    storage = Storage.open(str(tmp_path / "root"))
    import_positives(str(src), storage, splits=_splits(split_dir))
    nrows = [{f"nimg{j}": rgb(100 + 10 * i + j) for j in (1, 2, 3)} for i in range(4)]
    nrows[2]["nimg3"] = None
    nrows[3]["nimg1"] = b"garbage"
    dsrc = tmp_path / "flux.parquet"
    write_layout(dsrc, nrows, ["nimg1", "nimg2", "nimg3"], struct=True)

    counts = import_distractors(str(dsrc), storage, setting="flux", positives_src=str(src))
    assert (counts["input"], counts["written"], counts["rejected"], counts["empty_views"]) == (11, 10, 1, 1)
    t = storage.read_table(DISTRACTORS).sort_by([("id", "ascending"), ("view", "ascending")])
    assert t.num_rows == 10
    first = t.to_pylist()[0]
    assert {k: first[k] for k in ("id", "view", "setting", "split", "prompt", "generator", "seed",
                                  "status")} == {
        "id": "nearid-000000", "view": 0, "setting": "flux", "split": "train", "prompt": "",
        "generator": "imported:flux", "seed": -1, "status": "ok"}
    assert first["image"] == nrows[0]["nimg1"]
    splits = dict(zip(t["id"].to_pylist(), t["split"].to_pylist()))
    assert splits == {"nearid-000000": "train", "nearid-000001": "val", "nearid-000002": "train",
                      "nearid-000003": "test"}            # taken from the positives table
    rej = [r["key"] for r in storage.read_table(REJECTS).to_pylist()]
    assert "table=distractors/id=nearid-000003/view=0/setting=flux" in rej

    short = tmp_path / "short.parquet"
    write_layout(short, nrows[:3], ["nimg1", "nimg2", "nimg3"], struct=False)
    with pytest.raises(ValueError, match="row-aligned"):
        import_distractors(str(short), storage, setting="sdxl", positives_src=str(src))
    with pytest.raises(ValueError, match="setting"):
        import_distractors(str(dsrc), storage, setting="bad/name")


def test_mtg_oracle_by_hand(tmp_path):
    def mask(box, value=128, noise=127):
        m = np.full((16, 16), noise, np.uint8)       # 127 is not > 127: never counted
        (r0, r1), (c0, c1) = box
        m[r0:r1, c0:c1] = value                      # 128 is counted
        return png(m)

    def row(obj1, part1, obj2, part2):
        return {"image_1_original": rgb(1), "image_2_original": rgb(2),
                "image_1_inpainted": rgb(3), "image_2_inpainted": rgb(4),
                "image_1_object_mask": obj1, "image_1_part_mask": part1,
                "image_2_object_mask": obj2, "image_2_part_mask": part2}

    rows = [
        # object 8x8 = 64 px, part 4x4 = 16 px -> 0.75; object 10x10 = 100, part 5x2 = 10 -> 0.9
        row(mask(((0, 8), (0, 8))), mask(((0, 4), (0, 4))),
            mask(((0, 10), (0, 10))), mask(((0, 5), (0, 2)))),
        # object 16x16 = 256, part 16x4 = 64 -> 0.75; object 4x4 = 16, part 2x2 = 4 -> 0.75
        row(mask(((0, 16), (0, 16)), 255), mask(((0, 16), (0, 4)), 255),
            mask(((4, 8), (4, 8))), mask(((4, 6), (4, 6)))),
        # empty object mask -> rejected
        row(mask(((0, 0), (0, 0))), mask(((0, 4), (0, 4))),
            mask(((0, 10), (0, 10))), mask(((0, 5), (0, 2)))),
    ]
    cols = list(rows[0])
    write_layout(tmp_path / "mtg.parquet", rows, cols, struct=True)
    storage = Storage.open(str(tmp_path / "root"))
    counts = import_mtg(str(tmp_path / "mtg.parquet"), storage)
    assert (counts["input"], counts["written"], counts["rejected"]) == (3, 2, 1)
    t = storage.read_table(MTG).sort_by("id").to_pylist()
    assert [r["id"] for r in t] == ["mtg-test-000000", "mtg-test-000001"]   # ids carry the split
    assert [(r["oracle1"], r["oracle2"]) for r in t] == [(0.75, 0.9), (0.75, 0.75)]
    assert t[0]["split"] == "test" and t[0]["image_2p"] == rows[0]["image_2_inpainted"]
    rej = storage.read_table(REJECTS).to_pylist()
    assert rej[0]["key"] == "table=mtg/id=mtg-test-000002" and "image_1_object_mask" in rej[0]["reason"]


def test_split_file_errors(tmp_path):
    f = tmp_path / "val.json"
    f.write_text("[0, 5, 2]")
    assert read_split_file(str(f), n_rows=6) == [0, 5, 2]
    with pytest.raises(ValueError, match=r"val\.json.*index 5 is out of range"):
        read_split_file(str(f), n_rows=5)
    f.write_text(json.dumps({"indices": [1, 3, 1]}))
    with pytest.raises(ValueError, match=r"val\.json.*index 1 appears more than once"):
        read_split_file(str(f))
    f.write_text("[-1]")
    with pytest.raises(ValueError, match="index -1"):
        read_split_file(str(f))
    f.write_text('["3"]')
    with pytest.raises(ValueError, match="not an integer"):
        read_split_file(str(f))

    # an index in two split files, and an index past the source's rows
    write_layout(tmp_path / "p.parquet", [positive_row(0), positive_row(1)], POS_IMAGES, struct=False)
    (tmp_path / "a.json").write_text("[0, 1]")
    (tmp_path / "b.json").write_text("[1]")
    (tmp_path / "c.json").write_text("[2]")
    storage = Storage.open(str(tmp_path / "root"))
    with pytest.raises(ValueError, match=r"b\.json: index 1 is also in split 'train'"):
        import_positives(str(tmp_path / "p.parquet"), storage,
                         splits={"train": str(tmp_path / "a.json"), "test": str(tmp_path / "b.json")})
    with pytest.raises(ValueError, match=r"c\.json: index 2 is out of range \(the source has 2 rows\)"):
        import_positives(str(tmp_path / "p.parquet"), storage, splits={"test": str(tmp_path / "c.json")})
    assert not storage.table_exists("positives")


def test_missing_columns_named(tmp_path):
    row = positive_row(0)
    del row["masks2"], row["category_description"]
    write_layout(tmp_path / "broken.parquet", [row], POS_IMAGES, struct=False)
    storage = Storage.open(str(tmp_path / "root"))
    with pytest.raises(ValueError, match=r"broken\.parquet is missing columns \['masks2', "
                                         r"'category_description'\]"):
        import_positives(str(tmp_path / "broken.parquet"), storage)
    write_layout(tmp_path / "nomtg.parquet", [{"image_1_original": rgb(0)}], ["image_1_original"], True)
    with pytest.raises(ValueError, match="image_2_part_mask"):
        import_mtg(str(tmp_path / "nomtg.parquet"), storage)


def test_s3_source_and_cli(tmp_path, s3_server, positives_dir, split_dir, capsys):
    import boto3

    endpoint, bucket = s3_server
    src, _ = positives_dir
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for f in sorted(src.iterdir()):
        s3.upload_file(str(f), bucket, f"hf/nearid/{f.name}")
    storage = Storage.open(str(tmp_path / "root_s3"))
    counts = import_positives(f"s3://{bucket}/hf/nearid", storage,
                              storage_options={"endpoint_url": endpoint})
    assert (counts["written"], counts["rejected"]) == (9, 2)

    root = tmp_path / "root_cli"
    assert main(["positives", str(src), "--root", str(root), "--split-dir", str(split_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written"] == 9 and printed["by_split"]["val"] == 2
    assert Storage.open(str(root)).read_table(POSITIVES).num_rows == 9


# ---- the layouts as published, written by the `datasets` library itself -------------------------
def _hf():
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets


def _image_cells(values):
    return [None if v is None else {"bytes": v, "path": None} for v in values]


def hf_dataset(columns: dict, image_cols):
    """A `datasets.Dataset` whose `image_cols` carry the datasets Image feature (struct)."""
    datasets = _hf()
    cols = {k: (_image_cells(v) if k in image_cols else v) for k, v in columns.items()}
    ds = datasets.Dataset.from_dict(cols)
    for c in image_cols:
        ds = ds.cast_column(c, datasets.Image())
    return ds


RELEASE_IDS = [1003, 1017, 2208, 40112]          # sparse, as the release's `id`
SPLITS = ["train", "val", "train", "test"]


def release_positives(n: int = 4):
    rows = [positive_row(i, views=2 if i == 2 else 3) for i in range(n)]
    cols = {"id": RELEASE_IDS[:n]}
    cols.update({k: [r[k] for r in rows] for k in rows[0]})
    cols["quality"] = ["good", "ok", None, "good"][:n]
    cols["split"] = SPLITS[:n]
    return hf_dataset(cols, POS_IMAGES), rows


def release_distractors(n: int = 4, ids=RELEASE_IDS, seed: int = 100, drop=()):
    cols = {"id": list(ids[:n])}
    for j in (1, 2, 3):
        cols[f"nimg{j}"] = [None if (i == 2 and j == 3) else rgb(seed + 10 * i + j) for i in range(n)]
    for c in drop:
        del cols[c]
    return hf_dataset(cols, [c for c in cols if c.startswith("nimg")])


def hub_parquet(ds, folder, split: str = "train", shards: int = 2):
    """The hub's Parquet layout: data/<split>-0000k-of-0000n.parquet (+ a README)."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n")
    for k in range(shards):
        ds.shard(num_shards=shards, index=k, contiguous=True).to_parquet(
            str(folder / "data" / f"{split}-{k:05d}-of-{shards:05d}.parquet"))
    return folder


def save_dict(folder, shards: int = 2, **splits):
    _hf().DatasetDict(splits).save_to_disk(str(folder), num_shards={k: shards for k in splits})
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()                                       # only this command's output
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_release_layouts_keep_ids_and_columns(tmp_path, capsys):
    pos, rows = release_positives()
    src = hub_parquet(pos, tmp_path / "NearID")
    flux = save_dict(tmp_path / "NearID-Flux", train=release_distractors())
    sdxl = tmp_path / "NearID-SDXL"                          # a single save_to_disk Dataset
    release_distractors(seed=300).save_to_disk(str(sdxl), num_shards=2)
    root = tmp_path / "root"

    rc, out, _ = run_cli(capsys, "positives", src, "--root", root)
    assert rc == 0 and json.loads(out)["id_scheme"] == "source_id"
    storage = Storage.open(str(root))
    t = storage.read_table(POSITIVES).sort_by([("id", "ascending"), ("view", "ascending")]).to_pylist()
    assert sorted({r["id"] for r in t}) == ["nearid-001003", "nearid-001017", "nearid-002208",
                                            "nearid-040112"]
    by = {(r["id"], r["view"]): r for r in t}
    r = by[("nearid-040112", 2)]
    assert (r["source_row"], r["source_id"], r["objaverse_id"], r["quality"], r["split"]) == \
        (3, "40112", "obj3", "good", "test")
    assert by[("nearid-002208", 0)]["quality"] is None and ("nearid-002208", 2) not in by
    assert r["image"] == rows[3]["images3"]
    assert len(t) == 11                                       # 3 + 3 + 2 + 3 views

    for setting, folder in (("flux", flux), ("sdxl", sdxl)):
        rc, out, err = run_cli(capsys, "distractors", folder, "--root", root, "--setting", setting)
        assert rc == 0, err
        c = json.loads(out)
        assert (c["source_rows"], c["written"], c["empty_views"], c["rows_without_positive"]) == \
            (4, 11, 1, 0)
        assert c["layout"].startswith("save_to_disk")
    d = storage.read_table(DISTRACTORS).to_pylist()
    got = {(r["id"], r["view"], r["setting"]): r for r in d}
    assert len(got) == 22
    assert got[("nearid-040112", 0, "sdxl")]["split"] == "test"
    assert got[("nearid-001017", 1, "flux")]["image"] == rgb(100 + 10 * 1 + 2)
    assert {i for i, _, _ in got} == {r["id"] for r in t}


def test_source_ids_that_repeat_fall_back_to_positions_and_roots_never_mix(tmp_path, capsys):
    pos, _ = release_positives()
    dup = pos.map(lambda r: {"id": 7})                        # not unique -> row positions
    root = tmp_path / "root"
    rc, out, _ = run_cli(capsys, "positives", hub_parquet(dup, tmp_path / "dup"), "--root", root)
    c = json.loads(out)
    assert rc == 0 and c["id_scheme"] == "position" and "not unique" in c["id_scheme_reason"]
    t = Storage.open(str(root)).read_table(POSITIVES)
    assert set(t["id"].to_pylist()) == {f"nearid-00000{i}" for i in range(4)}
    assert set(t["source_id"].to_pylist()) == {"7"}
    ok = hub_parquet(pos, tmp_path / "ok")
    rc, _, err = run_cli(capsys, "positives", ok, "--root", root)
    assert rc == 2 and "_import-positives.json" in _one_error(err) and "ids by position" in err


def test_split_files_and_split_selection(tmp_path, capsys):
    pos, _ = release_positives()
    src = hub_parquet(pos, tmp_path / "NearID")
    pos.select([0]).to_parquet(str(src / "data" / "test-00000-of-00001.parquet"))   # a 2nd split
    d = tmp_path / "splits"
    d.mkdir()
    (d / "train.json").write_text("[0, 2]")
    (d / "test.json").write_text("[1, 3]")
    root = tmp_path / "root"
    rc, out, _ = run_cli(capsys, "positives", src, "--root", root, "--split-dir", d)
    assert rc == 0 and json.loads(out)["by_split"] == {"train": 5, "test": 6}
    rc, out, _ = run_cli(capsys, "positives", src, "--root", tmp_path / "r2", "--split", "test")
    assert rc == 0 and json.loads(out)["source_rows"] == 1
    rc, _, err = run_cli(capsys, "positives", src, "--root", tmp_path / "r3", "--split", "val")
    assert rc == 2 and "there is no split 'val'" in err and "['test', 'train']" in err


def mtg_dataset(n: int, seed: int):
    def mask(lo, hi):
        m = np.zeros((16, 16), np.uint8)
        m[lo:hi, lo:hi] = 255
        return png(m)

    cols = {"image_1_original": [rgb(seed + i) for i in range(n)],
            "image_2_original": [rgb(seed + 50 + i) for i in range(n)],
            "image_1_inpainted": [rgb(seed + 100 + i) for i in range(n)],
            "image_2_inpainted": [rgb(seed + 150 + i) for i in range(n)],
            "image_1_object_mask": [mask(0, 8)] * n, "image_1_part_mask": [mask(0, 4)] * n,
            "image_2_object_mask": [mask(0, 10)] * n, "image_2_part_mask": [mask(0, 5)] * n}
    return hf_dataset(cols, list(cols))


def test_mtg_train_and_test_into_one_root(tmp_path, capsys):
    from nearid.training.items import mtg_as_rows

    src = save_dict(tmp_path / "mtg-dataset", shards=1, train=mtg_dataset(3, 0), test=mtg_dataset(2, 500))
    root = tmp_path / "root"
    for split, n in (("train", 3), ("test", 2)):
        rc, out, err = run_cli(capsys, "mtg", src, "--root", root, "--split", split)
        assert rc == 0, err
        c = json.loads(out)
        assert (c["written"], c["skipped"]) == (n, 0)
        assert c["layout"] == f"save_to_disk DatasetDict, split '{split}'"
    t = Storage.open(str(root)).read_table(MTG).sort_by("id").to_pylist()
    assert [(r["id"], r["split"]) for r in t] == [
        ("mtg-test-000000", "test"), ("mtg-test-000001", "test"),
        ("mtg-train-000000", "train"), ("mtg-train-000001", "train"), ("mtg-train-000002", "train")]
    assert t[0]["image_1"] == rgb(500) and (t[0]["oracle1"], t[0]["oracle2"]) == (0.75, 0.75)
    rc, out, _ = run_cli(capsys, "mtg", src, "--root", root, "--split", "test")
    assert rc == 0 and json.loads(out)["skipped"] == 2          # a rerun imports nothing twice
    rc, _, err = run_cli(capsys, "mtg", src, "--root", root, "--split", "validation")
    assert rc == 2 and "no split 'validation'" in err
    # the training items prefix MTG ids with "mtg:"; both splits stay distinct keys
    feats = pa.table({"id": [r["id"] for r in t for _ in range(4)],
                      "view": pa.array([v for _ in t for v in range(4)], pa.int8()),
                      "source": ["mtg"] * 20, "split": [r["split"] for r in t for _ in range(4)]})
    ids = set(mtg_as_rows(feats)["id"].to_pylist())
    assert ids == {f"mtg:{r['id']}" for r in t} and len(ids) == 5


def test_save_to_disk_folder_on_s3(tmp_path, s3_server):
    import boto3

    endpoint, bucket = s3_server
    pos, _ = release_positives()
    storage = Storage.open(str(tmp_path / "root"))
    import_positives(str(hub_parquet(pos, tmp_path / "NearID")), storage)
    flux = save_dict(tmp_path / "NearID-Flux", train=release_distractors())
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for f in sorted(p for p in flux.rglob("*") if p.is_file()):
        s3.upload_file(str(f), bucket, f"hf/NearID-Flux/{f.relative_to(flux)}")
    counts = import_distractors(f"s3://{bucket}/hf/NearID-Flux", storage, setting="flux",
                                storage_options={"endpoint_url": endpoint})
    assert (counts["written"], counts["shards"], counts["layout"]) == \
        (11, 2, "save_to_disk DatasetDict, split 'train'")
    d = storage.read_table(DISTRACTORS).to_pylist()
    assert {r["id"] for r in d} == {f"nearid-{i:06d}" for i in RELEASE_IDS}
    assert {r["split"] for r in d if r["id"] == "nearid-001017"} == {"val"}


def test_stream_scanner_matches_pyarrow(tmp_path, monkeypatch):
    from nearid.importers.arrow_stream import read_small_column

    folder = save_dict(tmp_path / "d", shards=3, train=release_distractors())
    for f in sorted((folder / "train").glob("*.arrow")):
        with pa.OSFile(str(f)) as fh:
            info = scan_stream(fh, f.stat().st_size, str(f))
            ids = read_small_column(fh, info, "id")
        ref = pa.ipc.open_stream(str(f)).read_all()
        assert info.num_rows == ref.num_rows and ids.to_pylist() == ref["id"].to_pylist()
        assert info.schema.equals(ref.schema)
    src = open_source(str(folder))
    assert src.read_column("id") == RELEASE_IDS and src.num_rows == 4
    monkeypatch.setattr("nearid.importers.layouts.read_small_column", lambda *a: None)
    assert src.read_column("id") == RELEASE_IDS              # the whole-batch fallback agrees


# ---- bad input: one `error:` line naming the file, exit 2, nothing written ------------------------
def _files(root) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def root_with_positives(tmp_path):
    pos, _ = release_positives()
    src = hub_parquet(pos, tmp_path / "NearID")
    root = tmp_path / "root"
    import_positives(str(src), Storage.open(str(root)))
    return root, src


def test_truncated_arrow_shard(tmp_path, capsys, root_with_positives):
    root, _ = root_with_positives
    before = _files(root)
    flux = save_dict(tmp_path / "Flux", train=release_distractors())
    shard = flux / "train" / "data-00001-of-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-300])
    rc, _, err = run_cli(capsys, "distractors", flux, "--root", root, "--setting", "flux")
    line = _one_error(err)
    assert rc == 2 and str(shard) in line and "truncated" in line
    assert _files(root) == before                              # nothing written


def test_shard_without_nimg2(tmp_path, capsys, root_with_positives):
    root, _ = root_with_positives
    before = _files(root)
    good = save_dict(tmp_path / "Flux", train=release_distractors())
    bad = save_dict(tmp_path / "bad", train=release_distractors(drop=("nimg2",)))
    shard = good / "train" / "data-00001-of-00002.arrow"     # the second shard lacks nimg2
    shard.write_bytes((bad / "train" / shard.name).read_bytes())
    rc, _, err = run_cli(capsys, "distractors", good, "--root", root, "--setting", "flux")
    line = _one_error(err)
    assert rc == 2 and f"{shard} is missing columns ['nimg2']" in line
    assert _files(root) == before                              # nothing written


def test_distractors_of_another_length(tmp_path, capsys, root_with_positives):
    root, src = root_with_positives
    before = _files(root)
    short = save_dict(tmp_path / "Flux", train=release_distractors(n=3))
    for extra in ([], ["--positives-src", src]):
        rc, _, err = run_cli(capsys, "distractors", short, "--root", root, "--setting", "flux", *extra)
        line = _one_error(err)
        assert rc == 2 and str(short) in line and "3 rows" in line and "4" in line
        assert "row-aligned" in line
    shifted = save_dict(tmp_path / "Shifted", train=release_distractors(ids=[1003, 1017, 2209, 40112]))
    rc, _, err = run_cli(capsys, "distractors", shifted, "--root", root, "--setting", "flux")
    assert rc == 2 and "row 2 has id 2209 but positives row 2 has id 2208" in _one_error(err)
    assert _files(root) == before                              # nothing written


def test_split_index_past_the_end(tmp_path, capsys):
    pos, _ = release_positives()
    src = hub_parquet(pos, tmp_path / "NearID")
    d = tmp_path / "splits"
    d.mkdir()
    (d / "test.json").write_text("[3, 4]")
    root = tmp_path / "root"
    rc, _, err = run_cli(capsys, "positives", src, "--root", root, "--split-dir", d)
    line = _one_error(err)
    assert rc == 2 and f"{d / 'test.json'}: index 4 is out of range (the source has 4 rows)" in line
    assert not Storage.open(str(root)).table_exists("positives")


def test_folder_in_no_known_layout(tmp_path, capsys):
    folder = tmp_path / "NearID-Flux"
    folder.mkdir()
    (folder / "README.md").write_text("just a card")
    rc, _, err = run_cli(capsys, "distractors", folder, "--root", tmp_path / "root", "--setting", "flux")
    line = _one_error(err)
    assert rc == 2 and f"'{folder}' is in no known layout" in line
    assert "dataset_dict.json" in line and "state.json" in line and ".parquet" in line
    rc, _, err = run_cli(capsys, "distractors", tmp_path / "nope", "--root", tmp_path / "root",
                         "--setting", "flux")
    assert rc == 2 and "nope" in _one_error(err)
