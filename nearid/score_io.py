"""`nearid score --pairs`: the pairs file in, the scores out, in one format and on one scale.

Every score `nearid` writes (this command, `jobs.score`'s `scores` table, the MLflow model) is
the cosine similarity of the two L2-normalised embeddings, in [-1, 1]. (DreamBench++ M-H's
`100 * cos` is computed inside the M-H metric and the `mh-score` rating files, as its reference
protocol defines it.)

Formats, for the pairs file and for `--out`: `csv` (a header row), `json` (a list of objects, one
per pair: `reference`, `generated`, any other input columns, then `score`) and `parquet`. The
format of `--out` is `--format`, or else its extension (`.csv`, `.json`, `.parquet` / `.pq`).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pandas as pd

FORMATS = ("csv", "json", "parquet")
EXTENSIONS = {".csv": "csv", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
PAIR_COLUMNS = ("reference", "generated")


class ScoreIOError(ValueError):
    """A user mistake in a pairs file or an output choice; the message names the file or flag."""


def format_of(path: str, flag: str) -> str:
    """The format named by `path`'s extension; ScoreIOError naming `flag` and the file otherwise."""
    fmt = EXTENSIONS.get(os.path.splitext(str(path))[1].lower())
    if fmt is None:
        raise ScoreIOError(f"{path}: cannot tell the format of {flag} from its extension "
                           f"(use {', '.join(EXTENSIONS)}" + (" or --format)" if flag == "--out" else ")"))
    return fmt


def read_pairs(path: str, required: tuple[str, ...] = PAIR_COLUMNS, *, storage_options: dict | None = None,
               error: type[ValueError] = ScoreIOError) -> pd.DataFrame:
    """The one reader of pairs files (`nearid score --pairs`, the batch `jobs.score`, `nearid
    mh-score --pairs`): CSV (a header row), a JSON list of objects or Parquet, by extension; local
    or any fsspec URL (`storage_options`). `required` columns must be there and never blank; a
    value is a path / URL string or, in Parquet, image bytes. Other columns are kept. Every
    mistake is an `error` (a ValueError) naming the file, and the row or column."""
    fmt = format_of(path, "--pairs")
    if "://" not in str(path) and not Path(path).is_file():
        raise error(f"{path}: pairs file not found")
    try:
        import fsspec

        with fsspec.open(str(path), "rb", **(storage_options or {})) as f:
            if fmt == "csv":
                df = pd.read_csv(f, dtype={c: str for c in required}, keep_default_na=False)
            elif fmt == "parquet":
                df = pd.read_parquet(f)
            else:
                rows = json.load(f)
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise error(f"{path}: expected a JSON list of objects with {', '.join(required)}")
                df = pd.DataFrame(rows)
    except error:
        raise
    except FileNotFoundError:
        raise error(f"{path}: pairs file not found") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise error(f"{path}: cannot read as {fmt} ({type(e).__name__}: {e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise error(f"{path}: missing columns {missing}; has {list(df.columns)}")
    if df.empty:
        raise error(f"{path}: no pairs")
    for c in required:
        blank = df[c].map(lambda v: v is None or (isinstance(v, float) and math.isnan(v))
                          or (isinstance(v, (bytes, bytearray)) and not v)
                          or (isinstance(v, str) and not v.strip()))
        if blank.any():
            raise error(f"{path}: row {int(blank.to_numpy().nonzero()[0][0])} has no {c}")
        df[c] = df[c].map(lambda v: v if isinstance(v, (bytes, bytearray)) else str(v))
    return df.reset_index(drop=True)


def output_format(out: str | None, fmt: str | None) -> str | None:
    """The format to write: `fmt` if given, else `out`'s extension; None = a plain table on stdout.
    Checked before any scoring: a local `out` must be a file in an existing folder."""
    if out is not None and "://" not in str(out):
        if Path(out).is_dir():
            raise ScoreIOError(f"{out}: --out is a folder; give a file name (e.g. scores.csv)")
        if not Path(out).resolve().parent.is_dir():
            raise ScoreIOError(f"{out}: --out's folder {Path(out).parent} does not exist")
    if fmt is not None:
        if out is None and fmt == "parquet":
            raise ScoreIOError("--format parquet needs --out FILE (Parquet is not written to a terminal)")
        return fmt
    return format_of(out, "--out") if out is not None else None


def _json_records(frame: pd.DataFrame) -> list[dict]:
    cols = [*PAIR_COLUMNS, *[c for c in frame.columns if c not in (*PAIR_COLUMNS, "score")], "score"]
    records = json.loads(frame[cols].to_json(orient="records", double_precision=15))
    for r, s in zip(records, frame["score"]):
        r["score"] = float(s) if s is not None and not math.isnan(s) else None
    return records


def write_scores(frame: pd.DataFrame, out: str | None, fmt: str | None) -> str:
    """Write `frame` (pairs + `score`) to `out` in `fmt` (`output_format`), or print it when `out`
    is None; returns the line to print after a file was written ('' when printed)."""
    if out is None:
        if fmt is None:
            print(frame.to_string(index=False))
        elif fmt == "csv":
            frame.to_csv(sys.stdout, index=False)
        else:
            print(json.dumps(_json_records(frame), indent=2))
        return ""
    if fmt == "csv":
        frame.to_csv(out, index=False)
    elif fmt == "json":
        import fsspec

        with fsspec.open(out, "w", encoding="utf-8") as f:
            json.dump(_json_records(frame), f, indent=2)
            f.write("\n")
    else:
        frame.to_parquet(out, index=False)
    return f"wrote {len(frame)} scores (cosine, -1..1) to {out} ({fmt})"
