"""DreamBench++ M-H: agreement of an image-similarity scorer with the DreamBench++ human ratings.

Reads (and writes) the ratings folder in the layout the NearID reference publishes
(`dreambench_plus/ratings/`), every file one JSON object `{key: score}`:

    RATINGS_DIR/data_human_rating/merged_data/group1/<method>-cp.json   human group 1 (0..4)
    RATINGS_DIR/data_human_rating/merged_data/group2/<method>-cp.json   human group 2
    RATINGS_DIR/data_<scorer>_rating/<method>.json                      one folder per scorer
    RATINGS_DIR/data_<scorer>_rating/<sub>/<method>.json                (nested form, e.g. gpt)

The methods are those of the human folders (7 on the real benchmark). A key is
`<category>_<NN>_<concept>-<prompt>` (human) or the same plus a trailing `_<image>` (scorers,
whose keys come from image paths); scorers also call concept 20 `rubik's_cube` where the human
files say `magic_cube`. `canonical_key` reconciles both. Pairing is by key, never by position:
every scorer key must reconcile to exactly one human key of its method and every human key must
be scored, or the run fails naming the file and the key (a `RatingsError`).

M-H per (scorer, category): per method, the mean of Pearson r(scorer, group1) and
r(scorer, group2), each rounded to 4 decimals as the reference does; then FisherZ over the
methods, tanh(mean(atanh(clip(r, +-0.9999)))). A method whose r is undefined (constant scores or
fewer than two prompts) is left out of the FisherZ, as in the reference, and reported.

Beside each M-H value `nearid mh` prints Krippendorff's alpha (interval) of the scorer against
the humans (columns `alpha:<category>`, after the M-H columns): DreamBench++'s G-H protocol
(per method, a 2 x N reliability matrix {scorer, group g}, alpha averaged over the two groups)
with the scorer first mapped to the human scale (same mean and sd as the category's human
ratings) and the methods averaged; `human1-vs-human2` gets alpha(group1, group2). Exact
protocol: `dreambench_ratings.mh_alpha`.

`mh-score` writes a new scorer folder from images: a PAIRS table (CSV or Parquet) with columns
`method, key, reference, generated`, one row per generated image, where `method` is one of the
human methods, `key` its rating key (`<category>_<NN>_<concept>-<prompt>_<image>`, the image's
path below the run folder with `/` turned into `-` and no extension) and `reference` /
`generated` the image paths or URLs. `pairs_from_samples` builds it from the DreamBench++
samples release (`<run>/src_image/<rel>.png` against `<run>/tgt_image/<rel>.png`).

The ratings side (keys, files, M-H): nearid/benchmarks/dreambench_ratings.py, its names re-exported here.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..score_io import read_pairs
from .dreambench import MH_SCALE
from .dreambench_ratings import (CATEGORY_ORDER, CLIP, GROUPS, HUMAN_DIR, HUMAN_SUFFIX,  # noqa: F401
                                 KEY_ALIASES, SCORER_DIR, HumanRatings, RatingsError, canonical_key,
                                 category_of, find_scorers, format_mh, load_human, mh_scores, pearson,
                                 read_ratings)

PAIR_COLUMNS = ("method", "key", "reference", "generated")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# DreamBench++ samples run-folder prefix -> method name of the rating files (vit_huge -> vit_h)
RUN_PREFIX_TO_METHOD = {
    "blip_diffusion": "blip_diffusion",
    "dreambooth_lora_sdxl": "dreambooth_lora_sdxl",
    "dreambooth_sd": "dreambooth_sd",
    "emu2": "emu2",
    "ip_adapter_plus_vit_huge_sdxl": "ip_adapter_plus_vit_h_sdxl",
    "ip_adapter_vit_giant_sdxl": "ip_adapter_vit_g_sdxl",
    "textual_inversion_sd": "textual_inversion_sd",
}


# ----------------------------------------------------------------------------- new scorer folders
def read_mh_pairs(path: str) -> pd.DataFrame:
    """A PAIRS table (CSV, JSON or Parquet; `score_io.read_pairs`): method, key, reference,
    generated; one row per image."""
    return check_pairs(read_pairs(path, PAIR_COLUMNS, error=RatingsError), str(path))


def check_pairs(df: pd.DataFrame, what: str = "pairs") -> pd.DataFrame:
    missing = [c for c in PAIR_COLUMNS if c not in df.columns]
    if missing:
        raise RatingsError(f"{what}: missing columns {missing}; has {list(df.columns)}")
    if df.empty:
        raise RatingsError(f"{what}: no rows")
    df = df[list(PAIR_COLUMNS)].reset_index(drop=True)
    for c in PAIR_COLUMNS:
        blank = df[c].isna() | (df[c].astype(str).str.strip() == "")
        if blank.any():
            raise RatingsError(f"{what}: row {int(np.flatnonzero(blank)[0])} has no {c}")
    df = df.astype(str)
    dup = df.duplicated(["method", "key"], keep="first")
    if dup.any():
        r = df.iloc[int(np.flatnonzero(dup)[0])]
        raise RatingsError(f"{what}: key {r.key!r} of method {r.method!r} appears twice")
    return df


def check_pairs_against(pairs: pd.DataFrame, human: dict[str, HumanRatings], what: str) -> None:
    """Fail before scoring when a pair names a method or key the human ratings do not have."""
    for r in pairs.itertuples():
        h = human.get(r.method)
        if h is None:
            raise RatingsError(f"{what}: method {r.method!r} (key {r.key!r}) has no human ratings "
                               f"(methods: {', '.join(human)})")
        if canonical_key(r.key) not in h.index:
            raise RatingsError(f"{what}: key {r.key!r} of method {r.method!r} matches no key of "
                               f"{h.path}")


def pairs_from_samples(root: str | Path) -> pd.DataFrame:
    """PAIRS from the DreamBench++ samples release: each run folder `<run>/src_image/<rel>` (the
    reference) against `<run>/tgt_image/<rel>` (the generation), key = <rel> with `/` -> `-`."""
    root = Path(root)
    runs = sorted(d for d in root.iterdir() if (d / "src_image").is_dir()) if root.is_dir() else []
    if not runs:
        raise RatingsError(f"{root}: no run folders with src_image/ and tgt_image/")
    rows = []
    for run in runs:
        prefixes = [p for p in RUN_PREFIX_TO_METHOD if run.name.startswith(p)]
        if not prefixes:
            raise RatingsError(f"{run}: run folder name starts with no known method "
                               f"({', '.join(RUN_PREFIX_TO_METHOD)})")
        method = RUN_PREFIX_TO_METHOD[max(prefixes, key=len)]
        images = {}
        for side in ("src_image", "tgt_image"):
            base = run / side
            images[side] = {str(p.relative_to(base).with_suffix("")): p for p in sorted(base.rglob("*"))
                            if p.suffix.lower() in IMAGE_EXTS}
        for side, other in (("src_image", "tgt_image"), ("tgt_image", "src_image")):
            lone = sorted(set(images[side]) - set(images[other]))
            if lone:
                raise RatingsError(f"{run / side / lone[0]}: no matching image in {run / other}")
        rows += [{"method": method, "key": rel.replace(os.sep, "-"), "reference": str(images["src_image"][rel]),
                  "generated": str(images["tgt_image"][rel])} for rel in sorted(images["src_image"])]
    return check_pairs(pd.DataFrame(rows), str(root))


def score_mh_pairs(pairs: pd.DataFrame, model_dir: str, use_ray: bool = True, actors: int = 1,
                   batch_size: int = 32) -> np.ndarray:
    """100 * cos(reference, generated) per pair, through the batch-scoring Ray Data stage
    (`nearid.stages.score.run_score`) or, with use_ray=False, in-process `score_pairs`.
    An unreadable image raises RatingsError naming the row and file."""
    if not use_ray:
        from ..images import BadImage
        from ..model import NearIDModel, score_pairs

        model = NearIDModel.from_pretrained(model_dir)
        for col in ("reference", "generated"):  # name the image, not a bare stack trace
            for i, p in enumerate(pairs[col]):
                if "://" not in p and not Path(p).is_file():
                    raise RatingsError(f"pairs row {i} (method {pairs['method'][i]!r}, key "
                                       f"{pairs['key'][i]!r}): {p}: file not found")
        try:
            cos = score_pairs(model, list(zip(pairs["reference"], pairs["generated"])), batch_size)
        except (OSError, BadImage) as e:
            raise RatingsError(f"pairs: cannot read an image ({e})") from None
        return MH_SCALE * np.asarray(cos, dtype=np.float64)

    from ..raytools import init_ray
    from ..stages.score import run_score
    from ..io.storage import Storage

    def local_abs(p: str) -> str:  # Ray workers need not share the driver's working directory
        return p if "://" in p else os.path.abspath(p)

    pairs = pairs.assign(reference=pairs["reference"].map(local_abs), generated=pairs["generated"].map(local_abs))
    ray = init_ray(None)
    with tempfile.TemporaryDirectory(prefix="nearid-mh-score-") as tmp:
        src = os.path.join(tmp, "pairs.parquet")
        pairs.assign(prompt=pairs["key"]).to_parquet(src)
        storage = Storage.open(os.path.join(tmp, "run"))
        run_score(ray, src, local_abs(model_dir), storage, num_actors=actors, batch_size=batch_size)
        out = storage.read_table("scores", columns=["pair", "score", "error"]).to_pandas()
    out = out.sort_values("pair").reset_index(drop=True)
    bad = out[out["error"] != ""]
    if len(bad):
        i = int(bad["pair"].iloc[0])
        raise RatingsError(f"pairs row {i} (method {pairs['method'][i]!r}, key {pairs['key'][i]!r}): "
                           f"{bad['error'].iloc[0]} ({len(bad)} unreadable pair(s))")
    return MH_SCALE * out["score"].to_numpy(dtype=np.float64)  # the scores table holds the cosine


def check_out_dir(out: str | Path) -> str:
    """The scorer name of an output folder, which must be named data_<name>_rating."""
    m = SCORER_DIR.match(Path(out).name)
    if not m or Path(out).name == HUMAN_DIR.parts[0]:
        raise RatingsError(f"{out}: output folder must be named data_<name>_rating "
                           f"(so `nearid mh` lists it as <name>)")
    return m.group("name")


def write_scorer_folder(out: str | Path, pairs: pd.DataFrame, scores: np.ndarray) -> list[Path]:
    """Write `<method>.json` {key: score} (keys sorted, as the reference writes them) for each
    method in `pairs`; each file appears atomically (temp file in the folder, then rename)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    frame = pairs.assign(score=np.asarray(scores, dtype=np.float64))
    for method, g in frame.groupby("method", sort=True):
        data = {k: float(v) for k, v in sorted(zip(g["key"], g["score"]))}
        fd, tmp = tempfile.mkstemp(prefix=f".{method}.", suffix=".tmp", dir=out)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=4)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out / f"{method}.json")
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        written.append(out / f"{method}.json")
    return written


# ----------------------------------------------------------------------------- command line
def cli_mh(args) -> int:
    """`nearid mh RATINGS_DIR`: the M-H table; a user mistake is one `error:` line, exit 2."""
    try:
        res = mh_scores(args.ratings)
    except RatingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_mh(res))
    for name, cat, method in res["undefined"]:
        print(f"warning: {name} {cat}: Pearson r undefined for method {method} (constant scores); "
              "left out of the FisherZ", file=sys.stderr)
    return 0


def cli_mh_score(args) -> int:
    """`nearid mh-score (--pairs PAIRS | --samples DIR) --model DIR --out .../data_<name>_rating`."""
    try:
        name = check_out_dir(args.out)
        pairs = read_mh_pairs(args.pairs) if args.pairs else pairs_from_samples(args.samples)
        ratings = Path(args.out).parent
        if (ratings / HUMAN_DIR).is_dir():  # inside a ratings folder: check keys before scoring
            check_pairs_against(pairs, load_human(ratings), args.pairs or args.samples)
        scores = score_mh_pairs(pairs, args.model, use_ray=not args.no_ray, actors=args.actors,
                                batch_size=args.batch_size)
        written = write_scorer_folder(args.out, pairs, scores)
    except RatingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(pairs)} scores of scorer {name!r} to {len(written)} file(s) in {args.out}")
    return 0