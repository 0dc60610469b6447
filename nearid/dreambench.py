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

`mh-score` writes a new scorer folder from images: a PAIRS table (CSV or Parquet) with columns
`method, key, reference, generated`, one row per generated image, where `method` is one of the
human methods, `key` its rating key (`<category>_<NN>_<concept>-<prompt>_<image>`, the image's
path below the run folder with `/` turned into `-` and no extension) and `reference` /
`generated` the image paths or URLs. `pairs_from_samples` builds it from the DreamBench++
samples release (`<run>/src_image/<rel>.png` against `<run>/tgt_image/<rel>.png`).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import fisher_z_mean

HUMAN_DIR = Path("data_human_rating") / "merged_data"
GROUPS = ("group1", "group2")
HUMAN_SUFFIX = "-cp.json"
SCORER_DIR = re.compile(r"^data_(?P<name>.+)_rating$")
CATEGORY_ORDER = ("object", "live_subject_animal", "live_subject_human", "style")
KEY_ALIASES = {"rubik's_cube": "magic_cube"}
CLIP = 0.9999
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
_CATEGORY = re.compile(r"^(?P<category>.+?)_\d+_")


class RatingsError(ValueError):
    """A user mistake in a ratings folder or PAIRS table; the message names the file and key."""


# ----------------------------------------------------------------------------- keys and files
def canonical_key(key: str) -> str:
    """The human-file spelling of a rating key: drop a trailing `_<n>`, apply KEY_ALIASES."""
    key = re.sub(r"_\d+$", "", key)
    for src, dst in KEY_ALIASES.items():
        key = key.replace(src, dst)
    return key


def category_of(key: str) -> str | None:
    """`object_20_magic_cube-3` -> `object`; None when the key has no `<category>_<NN>_` head."""
    m = _CATEGORY.match(key)
    return m.group("category") if m else None


def _ordered_categories(cats) -> list[str]:
    present = set(cats)
    return [c for c in CATEGORY_ORDER if c in present] + sorted(present - set(CATEGORY_ORDER))


def _unique_object(path: Path):
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise RatingsError(f"{path}: key {k!r} appears twice")
            seen.add(k)
        return dict(pairs)
    return hook


def read_ratings(path: str | Path) -> dict[str, float]:
    """One rating file as {key: float}; refuses bad JSON, duplicate keys and non-numbers."""
    path = Path(path)
    if not path.is_file():
        raise RatingsError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_object(path))
    except json.JSONDecodeError as e:
        raise RatingsError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise RatingsError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, dict):
        raise RatingsError(f"{path}: expected a JSON object {{key: score}}, got {type(data).__name__}")
    if not data:
        raise RatingsError(f"{path}: no ratings")
    out = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RatingsError(f"{path}: key {k!r} has value {v!r}, not a finite number")
        out[k] = float(v)
    return out


# ----------------------------------------------------------------------------- ratings folder
class HumanRatings:
    """Both human groups of one method, aligned on group 1's keys (canonical spelling)."""

    def __init__(self, method: str, keys: list[str], g1: np.ndarray, g2: np.ndarray, path: Path):
        self.method, self.keys, self.g1, self.g2, self.path = method, keys, g1, g2, path
        self.index = {k: i for i, k in enumerate(keys)}
        self.categories = np.array([category_of(k) for k in keys], dtype=object)

    def align(self, scores: dict[str, float], path: Path) -> np.ndarray:
        """Scorer values in human-key order; every key must reconcile one-to-one."""
        out = np.full(len(self.keys), np.nan)
        seen: dict[str, str] = {}
        for raw, v in scores.items():
            k = canonical_key(raw)
            i = self.index.get(k)
            if i is None:
                raise RatingsError(f"{path}: key {raw!r} matches no key of the human ratings "
                                   f"{self.path} (reconciled as {k!r})")
            if k in seen:
                raise RatingsError(f"{path}: keys {seen[k]!r} and {raw!r} both reconcile to "
                                   f"human key {k!r}")
            seen[k] = raw
            out[i] = v
        missing = [self.keys[i] for i in np.flatnonzero(np.isnan(out))]
        if missing:
            raise RatingsError(f"{path}: missing {len(missing)} key(s) of the human ratings "
                               f"{self.path}, first {missing[0]!r}")
        return out


def _human_keys(ratings: dict[str, float], path: Path) -> dict[str, float]:
    out = {}
    for raw, v in ratings.items():
        k = canonical_key(raw)
        if k in out:
            raise RatingsError(f"{path}: two keys reconcile to {k!r} (one is {raw!r})")
        if category_of(k) is None:
            raise RatingsError(f"{path}: key {raw!r} is not <category>_<NN>_<concept>-<prompt>")
        out[k] = v
    return out


def load_human(root: str | Path) -> dict[str, HumanRatings]:
    """method -> HumanRatings; group1 and group2 must list the same methods and keys."""
    root = Path(root)
    if not root.is_dir():
        raise RatingsError(f"{root}: ratings folder not found")
    dirs = [root / HUMAN_DIR / g for g in GROUPS]
    for d in dirs:
        if not d.is_dir():
            raise RatingsError(f"{d}: human ratings folder missing (expected <method>{HUMAN_SUFFIX} files)")
    methods = [sorted(p.name[:-len(HUMAN_SUFFIX)] for p in d.glob(f"*{HUMAN_SUFFIX}")) for d in dirs]
    if not methods[0]:
        raise RatingsError(f"{dirs[0]}: no <method>{HUMAN_SUFFIX} files")
    for d, ms in zip(dirs[1:], methods[1:]):
        extra = sorted(set(ms) ^ set(methods[0]))
        if extra:
            raise RatingsError(f"{d}: human groups disagree on method {extra[0]!r} "
                               f"({dirs[0]} has {methods[0]}, {d} has {ms})")
    out = {}
    for m in methods[0]:
        p1, p2 = (d / f"{m}{HUMAN_SUFFIX}" for d in dirs)
        r1, r2 = _human_keys(read_ratings(p1), p1), _human_keys(read_ratings(p2), p2)
        for k in r2:
            if k not in r1:
                raise RatingsError(f"{p2}: key {k!r} is not in {p1}")
        for k in r1:
            if k not in r2:
                raise RatingsError(f"{p2}: missing key {k!r} of {p1}")
        keys = list(r1)
        out[m] = HumanRatings(m, keys, np.array([r1[k] for k in keys]), np.array([r2[k] for k in keys]), p1)
    return out


def find_scorers(root: str | Path) -> list[tuple[str, Path]]:
    """(name, folder) of each scorer: `data_<name>_rating/` holding `<method>.json` files, or
    `data_<name>_rating/<sub>/` (named `<name>/<sub>`); data_human_rating is not a scorer."""
    out = []
    for d in sorted(Path(root).iterdir()):
        m = SCORER_DIR.match(d.name)
        if not d.is_dir() or not m or d.name == HUMAN_DIR.parts[0]:
            continue
        if any(d.glob("*.json")):
            out.append((m.group("name"), d))
            continue
        subs = [s for s in sorted(d.iterdir()) if s.is_dir() and any(s.glob("*.json"))]
        if not subs:
            raise RatingsError(f"{d}: scorer folder has no <method>.json files")
        out += [(f"{m.group('name')}/{s.name}", s) for s in subs]
    return out


# ----------------------------------------------------------------------------- M-H
def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; NaN when undefined (fewer than two points or a constant side)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or x.min() == x.max() or y.min() == y.max():
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    return float(np.clip((xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc)), -1.0, 1.0))


def _r4(x, y) -> float:
    return round(pearson(x, y), 4)  # the reference rounds each r before averaging


def _fisher(per_method: dict[str, float]) -> float:
    rs = [r for r in per_method.values() if not math.isnan(r)]
    return fisher_z_mean(rs, clip=CLIP) if rs else float("nan")


def mh_scores(root: str | Path) -> dict:
    """M-H of every scorer folder under `root`, per category present in the human ratings.

    Returns {"categories": [...], "methods": [...], "n": {category: prompts per method},
    "scorers": {name: {category: M-H}}, "human": {category: FisherZ of r(group1, group2)},
    "per_method": {name: {category: {method: mean r}}}, "undefined": [(name, category, method)]}.
    Raises RatingsError naming the file and key of the first problem.
    """
    root = Path(root)
    human = load_human(root)
    scorers = find_scorers(root)
    if not scorers:
        raise RatingsError(f"{root}: no scorer folders (data_<scorer>_rating/<method>.json)")
    categories = _ordered_categories(c for h in human.values() for c in h.categories)
    out = {"categories": categories, "methods": list(human),
           "n": {c: int(sum((h.categories == c).sum() for h in human.values()) // len(human))
                 for c in categories},
           "scorers": {}, "human": {}, "per_method": {}, "undefined": []}
    for c in categories:
        out["human"][c] = _fisher({m: _r4(h.g1[h.categories == c], h.g2[h.categories == c])
                                   for m, h in human.items()})
    for name, folder in scorers:
        files = {p.stem: p for p in folder.glob("*.json")}
        for stem, p in sorted(files.items()):
            if stem not in human:
                raise RatingsError(f"{p}: no human ratings for method {stem!r} "
                                   f"(methods: {', '.join(human)})")
        per_cat: dict[str, dict[str, float]] = {c: {} for c in categories}
        for m, h in human.items():
            if m not in files:
                raise RatingsError(f"{folder / (m + '.json')}: file not found (scorer {name!r} "
                                   f"must rate every method of the human ratings)")
            s = h.align(read_ratings(files[m]), files[m])
            for c in categories:
                sel = h.categories == c
                if not sel.any():
                    continue
                r = (_r4(s[sel], h.g1[sel]) + _r4(s[sel], h.g2[sel])) / 2
                per_cat[c][m] = r
                if math.isnan(r):
                    out["undefined"].append((name, c, m))
        out["per_method"][name] = per_cat
        out["scorers"][name] = {c: _fisher(per_cat[c]) for c in categories}
    return out


def format_mh(res: dict) -> str:
    """One line per scorer (its folder name, then M-H per category), then the human ceiling."""
    cats = res["categories"]
    names = list(res["scorers"])
    width = max([len(n) for n in names] + [len("human1-vs-human2"), len("scorer")])
    cols = [max(len(c), 7) for c in cats]

    def line(name, values):
        return "  ".join([name.ljust(width)] + [f"{v:.4f}".rjust(w) for v, w in zip(values, cols)])

    lines = [f"DreamBench++ M-H: Pearson vs 2 human groups per method, FisherZ over "
             f"{len(res['methods'])} methods",
             "  ".join(["scorer".ljust(width)] + [c.rjust(w) for c, w in zip(cats, cols)])]
    lines += [line(n, [res["scorers"][n][c] for c in cats]) for n in names]
    lines.append(line("human1-vs-human2", [res["human"][c] for c in cats]))
    lines.append("prompts per method: " + ", ".join(f"{c} {res['n'][c]}" for c in cats))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- new scorer folders
def read_mh_pairs(path: str) -> pd.DataFrame:
    """A PAIRS table (CSV or Parquet): method, key, reference, generated; one row per image."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False) if str(path).endswith(".csv") \
            else pd.read_parquet(path)
    except FileNotFoundError:
        raise RatingsError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise RatingsError(f"{path}: cannot read as {'CSV' if str(path).endswith('.csv') else 'Parquet'} "
                           f"({type(e).__name__}: {e})") from None
    return check_pairs(df, str(path))


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
        from .images import BadImage
        from .model import NearIDModel, score_pairs

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
        return 100.0 * np.asarray(cos, dtype=np.float64)

    from .raytools import init_ray
    from .stages.score import run_score
    from .storage import Storage

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
    return out["score"].to_numpy(dtype=np.float64)


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
