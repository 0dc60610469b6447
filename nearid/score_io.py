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


def read_pairs(path: str) -> pd.DataFrame:
    """The pairs file (CSV, JSON list of objects, or Parquet) with `reference`, `generated` columns
    (paths or URLs, no blanks); any other columns are kept and written back beside the score (an
    old `score` column, as in a file this command wrote, is replaced by the new one)."""
    fmt = format_of(path, "--pairs")
    if "://" not in str(path) and not Path(path).is_file():
        raise ScoreIOError(f"{path}: pairs file not found")
    try:
        if fmt == "csv":
            df = pd.read_csv(path, dtype={c: str for c in PAIR_COLUMNS}, keep_default_na=False)
        elif fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            import fsspec

            with fsspec.open(path, "r", encoding="utf-8") as f:
                rows = json.load(f)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ScoreIOError(f"{path}: expected a JSON list of objects with reference, generated")
            df = pd.DataFrame(rows)
    except ScoreIOError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise ScoreIOError(f"{path}: cannot read as {fmt} ({type(e).__name__}: {e})") from None
    missing = [c for c in PAIR_COLUMNS if c not in df.columns]
    if missing:
        raise ScoreIOError(f"{path}: missing columns {missing}; has {list(df.columns)}")
    if df.empty:
        raise ScoreIOError(f"{path}: no pairs")
    for c in PAIR_COLUMNS:
        blank = df[c].isna() | (df[c].astype(str).str.strip() == "")
        if blank.any():
            raise ScoreIOError(f"{path}: row {int(blank.to_numpy().nonzero()[0][0])} has no {c}")
        df[c] = df[c].astype(str)
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
