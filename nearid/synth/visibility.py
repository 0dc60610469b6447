"""How visible a look-alike's change is at the rendered resolution, and re-drawing the invisible.

A change is visible when enough pixels differ between the reference and the look-alike drawn at
the same scale and pose: `visible_share` renders both upright at the scale that gives the
reference `area` of a res x res image, centres them on one canvas and counts the pixels whose
colour moves by more than PIXEL_DELTA in some channel (or that only one object covers), as a
share of the image. A part toggled on a 64-px lamp can change a dozen pixels; a colour swap
changes thousands. `visible_near_identity` re-draws (next seeds) a look-alike whose share is
below the threshold, so no distractor is one a person could not tell apart from the reference.
"""
from __future__ import annotations

import functools

import numpy as np

from nearid.synth.render import render_object, scale_for_area
from nearid.synth.spec import IdentitySpec
from nearid.synth.variation import perturb

PIXEL_DELTA = 40          # grey levels in one channel: a difference a person sees at a glance
MIN_VISIBLE_SHARE = 0.015  # of the image: about one 14-px patch at 112 px, 60 px at 64 px
MAX_REDRAWS = 16


def _canvas(spec: IdentitySpec, scale: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    obj = render_object(spec, scale)
    rgb = np.zeros((size, size, 3), np.int16)
    mask = np.zeros((size, size), bool)
    h, w = obj.labels.shape
    y0, x0 = (size - h) // 2, (size - w) // 2
    sy, sx = slice(max(0, -y0), min(h, size - y0)), slice(max(0, -x0), min(w, size - x0))
    dy, dx = slice(max(0, y0), max(0, y0) + sy.stop - sy.start), slice(max(0, x0), max(0, x0) + sx.stop - sx.start)
    mask[dy, dx] = obj.mask[sy, sx]
    rgb[dy, dx] = np.where(obj.mask[sy, sx, None], obj.rgb[sy, sx], 0)
    return rgb, mask


@functools.lru_cache(maxsize=65536)
def visible_share(reference: IdentitySpec, variant: IdentitySpec, res: int, area: float = 0.25) -> float:
    """Share of a res x res image that visibly differs between `reference` and `variant`, both
    drawn at the scale that gives `reference` `area` of the image (see module doc)."""
    scale = scale_for_area(reference, area * res * res)
    size = 2 * res  # room for a look-alike that grows
    a_rgb, a_mask = _canvas(reference, scale, size)
    b_rgb, b_mask = _canvas(variant, scale, size)
    moved = (np.abs(a_rgb - b_rgb).max(axis=-1) > PIXEL_DELTA) & a_mask & b_mask
    return float((moved | (a_mask ^ b_mask)).sum()) / float(res * res)


def visible_near_identity(spec: IdentitySpec, seed: int, *, n_changes: int | None, closeness: float,
                          res: int, area: float = 0.25, min_share: float = MIN_VISIBLE_SHARE,
                          vocab=None, attributes=None) -> tuple[IdentitySpec, int]:
    """(look-alike, re-draws): `perturb(spec, seed)`, else the first of seeds seed+1, seed+2, ...
    whose change is visible (visible_share >= min_share); after MAX_REDRAWS the most visible one
    drawn. min_share 0 keeps the first draw."""
    best, best_share = None, -1.0
    for redraw in range(MAX_REDRAWS + 1):
        variant = perturb(spec, int(seed) + redraw, n_changes=n_changes, closeness=closeness, vocab=vocab,
                          attributes=attributes)
        if min_share <= 0:
            return variant, 0
        share = visible_share(spec, variant, int(res), float(area))
        if share >= min_share:
            return variant, redraw
        if share > best_share:
            best, best_share = variant, share
    return best, MAX_REDRAWS
