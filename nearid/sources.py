"""The image sources: which table holds each one's images, how its rows become feature rows
(id, view, source, split), its split rule and whether training draws from it.

A feature row's `source` is one of:
- "positive": the identity's own views (`positives`, one row per view);
- a distractor setting name ("flux", "sdxl", ...; any name that is not one of the others): the
  look-alikes of that setting (`distractors` rows of that setting with status ok), view k in
  view k's background;
- "mtg": MTG part-edit samples (`mtg`: four image columns -> views 0..3: the two originals, then
  their part edits), trained on as extra items (`train.mtg_repeat`) and scored by MTG M-O;
- "graded": DreamBench++-style graded pairs, made by synth or imported (`graded`: reference and
  generated -> views 0 and 1, id "<id>/<method>", always the test split), only ever scored.

Extraction reads every available source through `scan`; the train stage's items and settings
and the evaluation's benchmarks (`nearid.benchmarks`, by `source`) follow the table here.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from .schema import DISTRACTORS, FEATURE_META, GRADED, MTG, POSITIVES

POSITIVE, MTG_SOURCE, GRADED_SOURCE = "positive", "mtg", "graded"
IMAGE_ROWS = pa.schema([*FEATURE_META, ("image", pa.binary())])   # what extraction reads, one row per image


@dataclass(frozen=True)
class ImageSource:
    table: str                       # the table holding its images
    keys: tuple[str, ...]            # columns read beside the images
    images: tuple[str, ...]          # one image column (rows carry `view`) or one per view
    fixed_split: str | None = None   # every row's split; None: the table's `split` column
    trains: bool = True              # training items draw from it
    joined_id: bool = False          # id = "<id>/<method>" (one image pair per method)
    setting: bool = False            # a distractor setting: `distractors` rows of that setting

    def long_rows(self, t: pa.Table, name: str, with_image: bool = True) -> pa.Table:
        """One row per image (id, view, source, split[, image]) of table rows `t`."""
        n = t.num_rows
        cols = ["id", "view", "source", "split"] + (["image"] if with_image else [])
        if len(self.images) == 1:
            return t.append_column("source", pa.array([name] * n, pa.string())).select(cols)
        ids = pa.array([f"{i}/{m}" for i, m in zip(t["id"].to_pylist(), t["method"].to_pylist())],
                       pa.string()) if self.joined_id else t["id"]
        split = pa.array([self.fixed_split] * n, pa.string()) if self.fixed_split else t["split"]
        parts = []
        for view, col in enumerate(self.images):
            d = {"id": ids, "view": pa.array([view] * n, pa.int8()), "source": pa.array([name] * n, pa.string()),
                 "split": split}
            if with_image:
                d["image"] = t[col]
            parts.append(pa.table(d))
        return pa.concat_tables(parts).select(cols)


MTG_VIEWS = ("image_1", "image_2", "image_1p", "image_2p")
SOURCES: dict[str, ImageSource] = {
    POSITIVE: ImageSource(POSITIVES.name, ("id", "view", "split"), ("image",)),
    MTG_SOURCE: ImageSource(MTG.name, ("id", "split"), MTG_VIEWS),
    GRADED_SOURCE: ImageSource(GRADED.name, ("id", "method"), ("reference", "generated"), fixed_split="test",
                               trains=False, joined_id=True),
}
SETTING = ImageSource(DISTRACTORS.name, ("id", "view", "split"), ("image",), setting=True)


def source(name: str) -> ImageSource:
    """The source of feature rows with `source == name` (any other name is a distractor setting)."""
    return SOURCES.get(name, SETTING)


def is_setting(name: str) -> bool:
    return source(name).setting


def available(storage, cfg) -> list[str]:
    """`extract.sources`, else every source with a table in this run root: positives, each
    distractor setting (sorted), mtg, graded."""
    if cfg.extract.sources:
        return list(cfg.extract.sources)
    out = [POSITIVE]
    if storage.table_exists(DISTRACTORS.name):
        out += sorted(set(storage.read_table(DISTRACTORS.name, columns=["setting"])["setting"].to_pylist()))
    out += [name for name, s in SOURCES.items() if name != POSITIVE and storage.table_exists(s.table)]
    return out


def scan(storage, name: str, splits=None, with_image: bool = True, batch_rows: int = 2048):
    """The long rows (id, view, source, split[, image]) of one source, streamed from its table a
    piece at a time (`Storage.scan`): the driver never holds a whole table's image bytes. `splits`
    filters sources that have a split column (a fixed-split source is always read whole)."""
    s = source(name)
    flt = (pc.field("setting") == name) & (pc.field("status") == "ok") if s.setting else None
    columns = list(s.keys) + (list(s.images) if with_image else [])
    for t in storage.scan(s.table, columns=columns, filter=flt, batch_rows=batch_rows):
        long = s.long_rows(t, name, with_image)
        if splits is not None and s.fixed_split is None:
            long = long.filter(pc.is_in(long["split"], pa.array(splits)))
        if long.num_rows:
            yield long


def image_rows(storage, name: str, splits=None) -> pa.Table:
    """The whole long table (id, view, source, split, image) of one source."""
    parts = list(scan(storage, name, splits))
    return pa.concat_tables(parts) if parts else IMAGE_ROWS.empty_table()
