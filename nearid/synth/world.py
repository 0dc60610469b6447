"""The synthetic NearID world: seeded identities, multi-view renders, distractors, MTG, graded.

Every random choice comes from its own numpy SeedSequence stream keyed by (seed, stream,
identity index, view, ...), so any single image can be produced alone, in any order, in any
process, and the same seed always gives byte-identical PNGs.

Difficulty dial: `closeness` in [0, 1] (see nearid.synth.variation): 1.0 = distractors differ
in one attribute, usually a subtle one; 0.0 = mostly two changes, colour jumps allowed.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from nearid.images import encode_png
from nearid.synth.backgrounds import KINDS, make_background, photo_background
from nearid.synth.grammar import describe, prompt_for
from nearid.synth.render import (Pose, pose_array, paste, region_names,
                                 render_object, scale_for_area, top_left)
from nearid.synth.shapes import draw_labels
from nearid.synth.spec import CATEGORIES, COLORS, IdentitySpec, random_spec
from nearid.synth.photos import PhotosUnavailable, load_photos
from nearid.synth.variation import check_closeness, perturb

log = logging.getLogger("nearid.synth")

SPLITS: tuple[str, ...] = ("train", "val", "test")
BACKGROUNDS: tuple[str, ...] = ("procedural", "photo")
ID_PREFIX = "syn-"
# Stream numbers: one per kind of random decision (a split's identities have their own stream).
_SPEC_STREAM = {"train": 101, "val": 102, "test": 103}
_POSE, _BG, _BG_KIND, _NEAR, _MTG, _GRADED, _RATER1, _RATER2 = 201, 202, 203, 301, 401, 501, 502, 503

# Fake personalisation methods and the typical attribute distance of what they generate.
METHOD_DISTANCES: dict[str, float] = {
    "sim_dreambooth": 0.8, "sim_ip_adapter_plus": 1.1, "sim_dreambooth_lora": 1.4,
    "sim_emu2": 1.7, "sim_ip_adapter": 2.0, "sim_blip_diffusion": 2.4,
    "sim_textual_inversion": 2.9,
}
METHODS: tuple[str, ...] = tuple(METHOD_DISTANCES)
MAX_GRADED_DISTANCE = 4


def _split_counts(split_sizes: Sequence[float | int], n: int) -> tuple[int, int, int]:
    if len(split_sizes) != 3:
        raise ValueError(f"split_sizes: expected (train, val, test), got {split_sizes!r}")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in split_sizes):
        counts = tuple(int(v) for v in split_sizes)
        if sum(counts) != n or min(counts) < 0:
            raise ValueError(f"split_sizes: counts {counts} must be >= 0 and sum to n_identities={n}")
        return counts  # type: ignore[return-value]
    fr = [float(v) for v in split_sizes]
    if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split_sizes: fractions {split_sizes!r} must be >= 0 and sum to 1")
    n_val, n_test = round(fr[1] * n), round(fr[2] * n)
    return n - n_val - n_test, n_val, n_test


class SynthWorld:
    """Seeded identities rendered in `n_views` views on different backgrounds (see module doc)."""

    def __init__(self, seed: int = 0, n_identities: int = 600, n_views: int = 3,
                 resolution: int = 96, split_sizes: Sequence[float | int] = (0.8, 0.1, 0.1),
                 closeness: float = 1.0, categories: Sequence[str] | None = None,
                 area_range: tuple[float, float] = (0.15, 0.32), backgrounds: str = "procedural") -> None:
        if n_identities < 1:
            raise ValueError(f"n_identities: expected >= 1, got {n_identities}")
        if n_views < 2:
            raise ValueError(f"n_views: expected >= 2, got {n_views}")
        if resolution < 32:
            raise ValueError(f"resolution: expected >= 32 px, got {resolution}")
        if not 0.0 < area_range[0] <= area_range[1] < 0.8:
            raise ValueError(f"area_range: expected 0 < lo <= hi < 0.8, got {area_range}")
        if backgrounds not in BACKGROUNDS:
            raise ValueError(f"backgrounds: expected one of {BACKGROUNDS}, got {backgrounds!r}")
        cats = tuple(categories) if categories is not None else CATEGORIES
        unknown = [c for c in cats if c not in CATEGORIES]
        if unknown or not cats:
            raise ValueError(f"categories: unknown {unknown} (known: {CATEGORIES})")
        self.seed, self.n_identities, self.n_views = int(seed), int(n_identities), int(n_views)
        self.resolution, self.closeness = int(resolution), check_closeness(closeness)
        self.categories, self.area_range = cats, (float(area_range[0]), float(area_range[1]))
        n_train, n_val, _ = _split_counts(split_sizes, self.n_identities)
        self._split_starts = (0, n_train, n_train + n_val)
        self._specs: dict[int, IdentitySpec] = {}
        self.backgrounds, self._photos = backgrounds, None

    @property
    def backgrounds_used(self) -> str:
        """"photo" when photo backgrounds were asked for and every pinned photo loaded, else
        "procedural" (the fallback, warned about once; NEARID_PRETRAINED_FALLBACK=0 raises)."""
        return "photo" if self.backgrounds == "photo" and self._photo_library() else "procedural"

    def _photo_library(self) -> list:
        if self._photos is None:
            try:
                self._photos = load_photos()
            except PhotosUnavailable as err:
                from nearid.backbones.dinov2_convert import env_flag
                from nearid.backbones.dinov2_small import ENV_FALLBACK

                if not env_flag(ENV_FALLBACK, True):
                    raise
                log.warning("photo backgrounds unavailable (%s); using the procedural backgrounds", err)
                self._photos = []
        return self._photos

    # ---- identities -------------------------------------------------------------------------
    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, *keys]))

    def ids(self) -> list[str]:
        """All identity ids, 'syn-000000' ... in index order (train, then val, then test)."""
        return [f"{ID_PREFIX}{i:06d}" for i in range(self.n_identities)]

    def index_of(self, id: str) -> int:
        """Integer index of an id; ValueError naming the id when it is not in this world."""
        try:
            if not id.startswith(ID_PREFIX):
                raise ValueError
            idx = int(id[len(ID_PREFIX):])
        except (ValueError, AttributeError, TypeError):
            raise ValueError(f"id: {id!r} is not a synthetic id like 'syn-000123'") from None
        if not 0 <= idx < self.n_identities:
            raise ValueError(f"id: {id!r} is outside this world (n_identities={self.n_identities})")
        return idx

    def split_of(self, id: str) -> str:
        """'train', 'val' or 'test', by position (fixed for given sizes)."""
        idx = self.index_of(id)
        return "test" if idx >= self._split_starts[2] else "val" if idx >= self._split_starts[1] else "train"

    def identity(self, id: str) -> IdentitySpec:
        """The identity's attributes; test identities come from their own RNG stream."""
        idx = self.index_of(id)
        if idx not in self._specs:
            self._specs[idx] = random_spec(self._rng(_SPEC_STREAM[self.split_of(id)], idx),
                                           self.categories)
        return self._specs[idx]

    def near_identity(self, spec: IdentitySpec, rng_or_seed: np.random.Generator | int,
                      n_changes: int | None = None) -> IdentitySpec:
        """A look-alike of `spec` (same category, 1-2 attributes changed at this closeness)."""
        return perturb(spec, rng_or_seed, n_changes=n_changes, closeness=self.closeness)

    def distractor_spec(self, id: str, slot: int = 0) -> IdentitySpec:
        """The world's own deterministic look-alike of an identity (slot = which one)."""
        return self.near_identity(self.identity(id), self._rng(_NEAR, self.index_of(id), slot))

    # ---- views ------------------------------------------------------------------------------
    def background(self, id: str, view: int) -> Image.Image:
        """The exact background of a view, without the object (views use distinct kinds, or
        distinct photos with photo backgrounds)."""
        idx = self.index_of(id)
        if view < 0:
            raise ValueError(f"view: expected >= 0, got {view}")
        photos = self._photo_library() if self.backgrounds == "photo" else []
        if photos:  # views of one identity start from different photos
            order = self._rng(_BG_KIND, idx).permutation(len(photos))
            return photo_background(self._rng(_BG, idx, view), self.resolution, photos,
                                    int(order[view % len(photos)]))
        kinds = self._rng(_BG_KIND, idx).permutation(len(KINDS))
        kind = KINDS[int(kinds[view % len(KINDS)])]
        return make_background(self._rng(_BG, idx, view), self.resolution, kind)

    def _pose_draws(self, spec: IdentitySpec, idx: int, view: int) -> tuple[float, float, bool, float, float]:
        """(scale, angle, flip, fx, fy) drawn for (identity, view); the scale makes `spec` cover
        the drawn area fraction, (fx, fy) is where its box centre should go (in image fractions)."""
        rng = self._rng(_POSE, idx, view)
        frac = rng.uniform(*self.area_range)
        angle = float(rng.uniform(-12.0, 12.0))
        flip = bool(rng.random() < 0.3)
        fx, fy = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.35, 0.65))
        return scale_for_area(spec, frac * self.resolution ** 2), angle, flip, fx, fy

    def _place(self, labels: np.ndarray, fx: float, fy: float) -> tuple[float, float]:
        """Canvas centre that puts the object's box centre at (fx, fy) * res, kept inside."""
        ys = np.nonzero(labels.any(axis=1))[0]
        xs = np.nonzero(labels.any(axis=0))[0]
        h, w = labels.shape
        res = self.resolution

        def axis(lo: int, hi: int, f: float) -> int:
            start = round(f * res - (lo + hi) / 2.0)
            low, high = 1 - lo, res - 1 - hi
            return round((low + high) / 2.0) if low > high else int(min(max(start, low), high))

        x0, y0 = axis(int(xs[0]), int(xs[-1]) + 1, fx), axis(int(ys[0]), int(ys[-1]) + 1, fy)
        return x0 + w / 2.0, y0 + h / 2.0

    def pose(self, id: str, view: int) -> Pose:
        """Scale, rotation, mirror and canvas centre of the identity in a view."""
        spec, idx = self.identity(id), self.index_of(id)
        scale, angle, flip, fx, fy = self._pose_draws(spec, idx, view)
        labels = pose_array(np.asarray(draw_labels(spec, scale)), angle, flip)
        cx, cy = self._place(labels, fx, fy)
        return Pose(scale, angle, flip, cx, cy)

    def _render(self, id: str, view: int, spec: IdentitySpec, pose: Pose | None = None,
                region: str | None = None, region_color: str | None = None):
        """Render `spec` into the view's background (own pose when `pose` is None)."""
        idx = self.index_of(id)
        if pose is None:
            scale, angle, flip, fx, fy = self._pose_draws(spec, idx, view)
            obj = render_object(spec, scale, angle, flip, region, region_color)
            cx, cy = self._place(obj.labels, fx, fy)
        else:
            obj = render_object(spec, pose.scale, pose.angle, pose.flip, region, region_color)
            cx, cy = pose.cx, pose.cy
        bg = np.asarray(self.background(id, view))
        return paste(bg, obj, *top_left(obj, cx, cy))

    def render_view(self, id: str, view: int) -> tuple[Image.Image, Image.Image]:
        """(RGB image, L mask 0/255) of one view; deterministic per (seed, id, view)."""
        img, mask, _ = self._render(id, view, self.identity(id))
        return _to_pil(img, mask)

    def render_distractor(self, id: str, view: int,
                          spec: IdentitySpec) -> tuple[Image.Image, Image.Image]:
        """`spec` in the view's exact background at the identity's pose (scale, angle, place)."""
        img, mask, _ = self._render(id, view, spec, pose=self.pose(id, view))
        return _to_pil(img, mask)

    # ---- tables -----------------------------------------------------------------------------
    def _ids(self, ids: Iterable[str] | None) -> Iterable[str]:
        return self.ids() if ids is None else ids

    def positives_rows(self, ids: Iterable[str] | None = None) -> Iterator[dict]:
        """One row per (id, view): the `positives` table columns, images as PNG bytes."""
        for id in self._ids(ids):
            spec = self.identity(id)
            description = describe(spec)
            for view in range(self.n_views):
                img, mask = self.render_view(id, view)
                yield {"id": id, "view": view, "split": self.split_of(id), "category": spec.category,
                       "description": description, "prompt": prompt_for(spec),
                       "image": encode_png(img), "mask": encode_png(mask)}

    def mtg_rows(self, ids: Iterable[str] | None = None) -> Iterator[dict]:
        """MTG-style rows: views 0 and 1, and the same views with one part region recoloured in
        place; oracle_k = 1 - part_area_k / object_area_k (pixel counts in view k)."""
        for id in self._ids(ids):
            idx, spec = self.index_of(id), self.identity(id)
            rng = self._rng(_MTG, idx)
            new_colors = [c for c in COLORS if c not in (spec.color1, spec.color2)]
            color = new_colors[int(rng.integers(len(new_colors)))]
            names = region_names(spec)
            row = None
            for k in rng.permutation(len(names)):
                row = self._mtg_row(id, spec, names[int(k)], color)
                if row is not None:
                    break
            if row is None:
                raise RuntimeError(f"mtg: no visible part region for {id} ({spec})")
            yield row

    def _mtg_row(self, id: str, spec: IdentitySpec, region: str, color: str) -> dict | None:
        row: dict = {"id": id, "split": self.split_of(id), "part": region}
        for k, view in ((1, 0), (2, 1)):
            img, mask, _ = self._render(id, view, spec)
            edited, _, part = self._render(id, view, spec, region=region, region_color=color)
            part_area, object_area = int(part.sum()), int(mask.sum())
            if part_area == 0:
                return None
            row[f"image_{k}"] = encode_png(Image.fromarray(img, "RGB"))
            row[f"image_{k}p"] = encode_png(Image.fromarray(edited, "RGB"))
            row[f"part_area_{k}"], row[f"object_area_{k}"] = part_area, object_area
            row[f"oracle{k}"] = 1.0 - part_area / object_area
        return row

    def graded_rows(self, ids: Iterable[str] | None = None, n_variants: int = 4) -> Iterator[dict]:
        """DreamBench++-style rows: reference = view 0; generated = a variant `distance`
        attribute changes away, in a new view; two simulated rater groups score 0..4."""
        for id in self._ids(ids):
            idx, spec = self.index_of(id), self.identity(id)
            ref, _ = self.render_view(id, 0)
            ref_png = encode_png(ref)
            for k in range(n_variants):
                method = METHODS[(idx * n_variants + k) % len(METHODS)]
                rng = self._rng(_GRADED, idx, k)
                d = int(np.clip(round(METHOD_DISTANCES[method] + rng.normal(0.0, 0.7)), 0,
                                MAX_GRADED_DISTANCE))
                variant = perturb(spec, rng, n_changes=d, closeness=0.5)
                img, _, _ = self._render(id, self.n_views + k, variant)
                yield {"id": id, "category": spec.category, "method": method,
                       "reference": ref_png, "generated": encode_png(Image.fromarray(img, "RGB")),
                       "distance": float(d), "rating_g1": _rating(self._rng(_RATER1, idx, k), d, 4.0, 0.9, 0.55),
                       "rating_g2": _rating(self._rng(_RATER2, idx, k), d, 3.7, 0.8, 0.85),
                       "prompt": prompt_for(spec)}


def _rating(rng: np.random.Generator, distance: int, top: float, slope: float, noise: float) -> float:
    """A rater's 0..4 score: falls with distance, plus this rater group's noise, rounded."""
    return float(np.clip(round(top - slope * distance + rng.normal(0.0, noise)), 0, 4))


def _to_pil(img: np.ndarray, mask: np.ndarray) -> tuple[Image.Image, Image.Image]:
    return Image.fromarray(img, "RGB"), Image.fromarray((mask * 255).astype(np.uint8), "L")
