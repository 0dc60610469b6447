"""DreamBench++ ratings folders and M-H (the whole story: nearid/benchmarks/dreambench_mh.py): keys and their
reconciliation, reading human and scorer rating files, and the per-category M-H and
Krippendorff's alpha of every scorer folder (`mh_scores`, `format_mh`)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ..metrics import fisher_z_mean

HUMAN_DIR = Path("data_human_rating") / "merged_data"
GROUPS = ("group1", "group2")
HUMAN_SUFFIX = "-cp.json"
SCORER_DIR = re.compile(r"^data_(?P<name>.+)_rating$")
CATEGORY_ORDER = ("object", "live_subject_animal", "live_subject_human", "style")
KEY_ALIASES = {"rubik's_cube": "magic_cube"}
CLIP = 0.9999
# Krippendorff's alpha: scorer values on the human scale are rounded to this step (see mh_alpha)
ALPHA_GRID = 0.05
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


# ----------------------------------------------------------------------------- Pearson
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


# ----------------------------------------------------------------------------- Krippendorff's alpha
def interval_alpha(a: np.ndarray, b: np.ndarray) -> float:
    """Krippendorff's alpha, interval level, of two raters over the same units (the `krippendorff`
    package); NaN when undefined (every value the same)."""
    import krippendorff

    data = np.vstack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])
    if len(np.unique(data)) < 2:
        return float("nan")
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="interval"))


def to_human_scale(scores: np.ndarray, human: np.ndarray) -> np.ndarray:
    """Scorer values mapped linearly onto the human scale, then rounded to ALPHA_GRID: the same
    mean and (population) standard deviation as `human` (every human rating of the scope, both
    groups); a constant scorer maps to the human mean."""
    s, h = np.asarray(scores, dtype=np.float64), np.asarray(human, dtype=np.float64)
    sd = s.std()
    z = (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
    steps = round(1 / ALPHA_GRID)  # k / 20, not k * 0.05: 0.15, not 0.15000000000000002
    return np.round((z * h.std() + h.mean()) * steps) / steps


def _mean(values) -> float:
    vs = [v for v in values if not math.isnan(v)]
    return float(np.mean(vs)) if vs else float("nan")


def mh_alpha(scores: dict[str, np.ndarray], human: dict[str, HumanRatings], category: str):
    """Krippendorff's alpha (interval) of a scorer against the humans within one category.

    The protocol (DreamBench++'s G-H alpha, `krippendorff_analysis.py`, made scale-free):
    1. Put the scorer on the human scale. Within the category, over all methods' prompts
       together, the scorer values are mapped linearly to the mean and standard deviation of the
       human ratings of the same prompts (both groups), then rounded to ALPHA_GRID (0.05 of a
       rating point: the package holds units x values x values in memory, so continuous values
       must be binned; on the vendored published ratings the binning moves a category's alpha by
       < 0.001 and a method's by < 0.005 against the unbinned closed form). Between-method
       differences in level stay in the data: a scorer that rates a weak method as high as a
       strong one loses agreement, which Pearson within each method cannot see.
    2. Per method: reliability data matrix of 2 raters x N prompts, rows {scorer on the human
       scale, group g}, one call per group g; alpha of the method = mean over the 2 groups (as
       DreamBench++ averages G-H over its human groups).
    3. The category value: the arithmetic mean over methods (alpha is not a correlation, so no
       FisherZ); a method whose alpha is undefined is left out.
    Returns (category alpha, {method: alpha}).
    """
    sel = {m: h.categories == category for m, h in human.items()}
    sel = {m: v for m, v in sel.items() if v.any()}
    pooled_s = np.concatenate([scores[m][v] for m, v in sel.items()])
    pooled_h = np.concatenate([np.r_[human[m].g1[v], human[m].g2[v]] for m, v in sel.items()])
    mapped = to_human_scale(pooled_s, pooled_h)
    per_method, start = {}, 0
    for m, v in sel.items():
        s = mapped[start:start + int(v.sum())]
        start += int(v.sum())
        per_method[m] = _mean(interval_alpha(s, g[v]) for g in (human[m].g1, human[m].g2))
    return _mean(per_method.values()), per_method


def human_alpha(human: dict[str, HumanRatings], category: str) -> float:
    """Inter-group alpha (DreamBench++ H-H): per method alpha(group1, group2), mean over methods."""
    return _mean(interval_alpha(h.g1[h.categories == category], h.g2[h.categories == category])
                 for h in human.values() if (h.categories == category).any())


# ----------------------------------------------------------------------------- M-H
def mh_scores(root: str | Path) -> dict:
    """M-H and Krippendorff's alpha of every scorer folder under `root`, per category present in
    the human ratings.

    Returns {"categories": [...], "methods": [...], "n": {category: prompts per method},
    "scorers": {name: {category: M-H}}, "human": {category: FisherZ of r(group1, group2)},
    "per_method": {name: {category: {method: mean r}}}, "undefined": [(name, category, method)],
    "alpha": {name: {category: alpha}} (`mh_alpha`), "alpha_per_method": {name: {category:
    {method: alpha}}}, "human_alpha": {category: alpha(group1, group2)} (`human_alpha`)}.
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
           "scorers": {}, "human": {}, "per_method": {}, "undefined": [],
           "alpha": {}, "alpha_per_method": {}, "human_alpha": {}}
    for c in categories:
        out["human"][c] = _fisher({m: _r4(h.g1[h.categories == c], h.g2[h.categories == c])
                                   for m, h in human.items()})
        out["human_alpha"][c] = human_alpha(human, c)
    for name, folder in scorers:
        files = {p.stem: p for p in folder.glob("*.json")}
        for stem, p in sorted(files.items()):
            if stem not in human:
                raise RatingsError(f"{p}: no human ratings for method {stem!r} "
                                   f"(methods: {', '.join(human)})")
        per_cat: dict[str, dict[str, float]] = {c: {} for c in categories}
        aligned = {}
        for m, h in human.items():
            if m not in files:
                raise RatingsError(f"{folder / (m + '.json')}: file not found (scorer {name!r} "
                                   f"must rate every method of the human ratings)")
            s = aligned[m] = h.align(read_ratings(files[m]), files[m])
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
        alphas = {c: mh_alpha(aligned, human, c) for c in categories}
        out["alpha"][name] = {c: a for c, (a, _) in alphas.items()}
        out["alpha_per_method"][name] = {c: pm for c, (_, pm) in alphas.items()}
    return out


def format_mh(res: dict) -> str:
    """One line per scorer (its folder name, then M-H per category, then Krippendorff's alpha per
    category in the columns `alpha:<category>`), then the human ceiling. The M-H columns come
    first, so a reader that takes a scorer's first values (or zips them with the header) still
    gets M-H."""
    cats = res["categories"]
    names = list(res["scorers"])
    width = max([len(n) for n in names] + [len("human1-vs-human2"), len("scorer")])
    heads = list(cats) + [f"alpha:{c}" for c in cats]
    cols = [max(len(c), 7) for c in heads]

    def line(name, mh, alpha):
        return "  ".join([name.ljust(width)] + [f"{v:.4f}".rjust(w) for v, w in zip([*mh, *alpha], cols)])

    lines = [f"DreamBench++ M-H: Pearson vs 2 human groups per method, FisherZ over "
             f"{len(res['methods'])} methods; alpha: Krippendorff's interval alpha vs each group "
             f"(scorer mapped to the human scale), mean over groups and methods",
             "  ".join(["scorer".ljust(width)] + [c.rjust(w) for c, w in zip(heads, cols)])]
    lines += [line(n, [res["scorers"][n][c] for c in cats], [res["alpha"][n][c] for c in cats])
              for n in names]
    lines.append(line("human1-vs-human2", [res["human"][c] for c in cats],
                      [res["human_alpha"][c] for c in cats]))
    lines.append("prompts per method: " + ", ".join(f"{c} {res['n'][c]}" for c in cats))
    return "\n".join(lines)
