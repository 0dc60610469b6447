"""The image-source table (`nearid.sources`): which sources a run root has, how each one's rows
become feature rows, its split rule, and what training and the benchmarks take from it."""
from __future__ import annotations

import pyarrow as pa
import pytest

from nearid import sources
from nearid.benchmarks import registry
from nearid.config import Config
from nearid.schema import DISTRACTORS, GRADED, MTG, POSITIVES
from nearid.stages.train import train_settings
from nearid.io.storage import Storage


def _write(storage, spec, rows: list[dict]) -> None:
    storage.write_table(spec, pa.Table.from_pylist(rows, schema=spec.schema))


@pytest.fixture
def root(tmp_path):
    st = Storage.open(str(tmp_path / "root"))
    _write(st, POSITIVES, [{"id": i, "view": v, "split": sp, "image": f"p{i}{v}".encode()}
                           for i, sp in (("a", "train"), ("b", "test")) for v in range(3)])
    _write(st, DISTRACTORS, [{"id": i, "view": v, "setting": s, "split": sp, "image": f"{s}{i}{v}".encode(),
                              "status": "rejected" if (i, v, s) == ("a", 1, "sdxl") else "ok"}
                             for i, sp in (("a", "train"), ("b", "test")) for v in range(3) for s in ("sdxl", "flux")])
    _write(st, MTG, [{"id": "m0", "split": "train", "image_1": b"1", "image_2": b"2", "image_1p": b"1p",
                      "image_2p": b"2p", "oracle1": 0.5, "oracle2": 0.4}])
    _write(st, GRADED, [{"id": "r0", "method": m, "category": "mug", "prompt": "", "reference": b"ref",
                         "generated": f"gen-{m}".encode(), "rating_g1": 1.0, "rating_g2": 2.0}
                        for m in ("dreambooth", "emu2")])
    return st


def rows(t: pa.Table) -> list[tuple]:
    return sorted(zip(*(t[c].to_pylist() for c in ("id", "view", "source", "split", "image"))))


def test_each_source_reads_its_table_by_its_rule(root):
    cfg = Config()
    assert sources.available(root, cfg) == ["positive", "flux", "sdxl", "mtg", "graded"]
    assert sources.available(root, Config.model_validate({"extract": {"sources": ["positive"]}})) == ["positive"]
    # a setting: its own distractors with status ok, view k kept
    assert rows(sources.image_rows(root, "sdxl")) == [
        ("a", 0, "sdxl", "train", b"sdxla0"), ("a", 2, "sdxl", "train", b"sdxla2"),
        ("b", 0, "sdxl", "test", b"sdxlb0"), ("b", 1, "sdxl", "test", b"sdxlb1"), ("b", 2, "sdxl", "test", b"sdxlb2")]
    # mtg: four image columns -> views 0..3 (originals, then their part edits), the table's split
    assert rows(sources.image_rows(root, "mtg")) == [
        ("m0", 0, "mtg", "train", b"1"), ("m0", 1, "mtg", "train", b"2"),
        ("m0", 2, "mtg", "train", b"1p"), ("m0", 3, "mtg", "train", b"2p")]
    # graded: reference / generated -> views 0 / 1, one id per method, always test, whatever `splits`
    graded = sources.image_rows(root, "graded", splits=["train"])
    assert rows(graded) == [("r0/dreambooth", 0, "graded", "test", b"ref"), ("r0/dreambooth", 1, "graded", "test",
                            b"gen-dreambooth"), ("r0/emu2", 0, "graded", "test", b"ref"),
                            ("r0/emu2", 1, "graded", "test", b"gen-emu2")]
    assert [r[0] for r in rows(sources.image_rows(root, "positive", splits=["test"]))] == ["b"] * 3
    for name in sources.available(root, cfg):
        assert sources.image_rows(root, name).schema.equals(sources.IMAGE_ROWS)


def test_training_and_the_benchmarks_follow_the_table(root):
    assert [n for n in ("positive", "flux", "mtg", "graded") if sources.source(n).trains] == ["positive", "flux", "mtg"]
    assert [n for n in ("positive", "flux", "anything-new", "mtg", "graded") if sources.is_setting(n)] \
        == ["flux", "anything-new"]
    assert train_settings(Config(), root) == ["flux", "sdxl"]
    held = Config.model_validate({"generate": {"held_apart": ["sdxl"]}})
    assert train_settings(held, root) == ["flux"]
    # each benchmark scores one source of the table; its fixed split makes it scored on any split
    assert {b.source for b in registry.BENCHMARKS if b.source} <= set(sources.SOURCES)
    assert registry.every_split_sources() == ["graded"]
