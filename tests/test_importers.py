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
                              read_split_file)
from nearid.schema import DISTRACTORS, MTG, POSITIVES, REJECTS
from nearid.storage import Storage

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
    assert [r["id"] for r in t] == ["mtg-000000", "mtg-000001"]
    assert [(r["oracle1"], r["oracle2"]) for r in t] == [(0.75, 0.9), (0.75, 0.75)]
    assert t[0]["split"] == "test" and t[0]["image_2p"] == rows[0]["image_2_inpainted"]
    rej = storage.read_table(REJECTS).to_pylist()
    assert rej[0]["key"] == "table=mtg/id=mtg-000002" and "image_1_object_mask" in rej[0]["reason"]


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
