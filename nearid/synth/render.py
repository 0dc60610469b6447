"""Colour an object's label map, pose it, and paste it onto a background with an exact mask.

Everything is numpy + PIL and integer-exact: nearest-neighbour rotation keeps the label map,
the colours and any edit region aligned pixel for pixel, so masks are exact and binary.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nearid.synth.shapes import BODY, FRAME, HAS_FRAME, draw_labels, part_label
from nearid.synth.spec import PALETTE, IdentitySpec

REFERENCE_SCALE = 32.0  # pixels per object unit when measuring an object's area and extent
OUTLINE_FACTOR = 0.55   # darkened label boundaries keep parts readable at low resolution
CELL_FRACTION = 0.2     # pattern cell, in object units (0.3 read no better in a short trial)


@dataclass
class RenderedObject:
    """A posed object on its own canvas: colours, label map and an optional edit region."""

    rgb: np.ndarray                 # (h, w, 3) uint8, meaningful where labels > 0
    labels: np.ndarray              # (h, w) uint8, 0 = not the object
    region: np.ndarray | None = None  # (h, w) bool, the edited part region if one was asked

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0


@dataclass(frozen=True)
class Pose:
    """Where an object sits in a view: scale (px per unit), rotation, mirror, canvas centre."""

    scale: float
    angle: float
    flip: bool
    cx: float
    cy: float


def cell_size(scale: float) -> int:
    """Pattern cell in pixels: about a fifth of an object unit, never below 3 px."""
    return max(3, round(CELL_FRACTION * scale))


def pattern_mask(pattern: str, shape: tuple[int, int], scale: float,
                 body: np.ndarray) -> np.ndarray:
    """Where colour2 replaces colour1 on the body, in canvas-centred pixel coordinates."""
    h, w = shape
    c = cell_size(scale)
    y, x = np.mgrid[0:h, 0:w]
    y = y - h // 2
    x = x - w // 2
    if pattern == "stripes":
        return (y // c) % 2 == 1
    if pattern == "checks":
        return ((x // c) + (y // c)) % 2 == 1
    if pattern == "diagonal":
        return ((x + y) // round(1.4 * c)) % 2 == 1
    if pattern == "zigzag":
        tri = np.abs(((x / (2.0 * c)) % 1.0) - 0.5) * 2.0 * c
        return ((y + tri) // c).astype(np.int64) % 2 == 1
    if pattern == "dots":
        p = 2 * c
        row = y // p
        xs = (x + (row % 2) * c) % p - p / 2.0 + 0.5
        ys = y % p - p / 2.0 + 0.5
        return xs * xs + ys * ys <= (0.36 * p) ** 2
    if pattern == "solid":
        # "trim": bands of colour2 along the top and bottom of the body.
        rows = np.nonzero(body.any(axis=1))[0]
        out = np.zeros(shape, dtype=bool)
        if rows.size:
            band = max(2, round(0.5 * c))
            out[rows[0]:rows[0] + band] = True
            out[rows[-1] - band + 1:rows[-1] + 1] = True
        return out
    raise ValueError(f"pattern: unknown pattern {pattern!r}")


def region_names(spec: IdentitySpec) -> list[str]:
    """Regions an MTG-style edit may recolour: present parts, the frame, body thirds."""
    names = list(spec.parts)
    if spec.category in HAS_FRAME:
        names.append("frame")
    return names + ["body_top", "body_bottom"]


def region_mask(spec: IdentitySpec, region: str, labels: np.ndarray) -> np.ndarray:
    """Pixels of a named region in an unposed label map."""
    if region == "frame":
        return labels == FRAME
    if region in ("body_top", "body_bottom"):
        body = labels == BODY
        rows = np.nonzero(body.any(axis=1))[0]
        if not rows.size:
            return body
        third = rows[0] + (rows[-1] - rows[0] + 1) // 3
        y = np.arange(labels.shape[0])[:, None]
        return body & (y < third if region == "body_top" else y >= rows[-1] + 1 - (third - rows[0]))
    if region in spec.parts:
        return labels == part_label(spec.category, region)
    raise ValueError(f"region: {region!r} is not one of {region_names(spec)}")


def _shade(labels: np.ndarray) -> np.ndarray:
    """Per-pixel brightness: a cylinder-like falloff across the object plus dark outlines."""
    h, w = labels.shape
    cols = np.nonzero((labels > 0).any(axis=0))[0]
    mid = (cols[0] + cols[-1]) / 2.0 if cols.size else w / 2.0
    half = max(1.0, (cols[-1] - cols[0]) / 2.0) if cols.size else w / 2.0
    xr = np.clip((np.arange(w) - mid) / half, -1.0, 1.0)
    factor = np.broadcast_to(1.08 - 0.36 * xr * xr - 0.06 * xr, (h, w)).copy()
    padded = np.pad(labels, 1, mode="constant")
    edge = ((padded[1:-1, 1:-1] != padded[:-2, 1:-1]) | (padded[1:-1, 1:-1] != padded[2:, 1:-1])
            | (padded[1:-1, 1:-1] != padded[1:-1, :-2]) | (padded[1:-1, 1:-1] != padded[1:-1, 2:]))
    factor[edge] *= OUTLINE_FACTOR
    return factor


def colorize(spec: IdentitySpec, labels: np.ndarray, scale: float,
             region: np.ndarray | None = None, region_color: str | None = None) -> np.ndarray:
    """RGB of an unposed label map: body in colour1 with the pattern in colour2, everything
    else in colour2; `region` pixels take `region_color` instead (shading kept)."""
    c1 = np.array(PALETTE[spec.color1], dtype=np.float32)
    c2 = np.array(PALETTE[spec.color2], dtype=np.float32)
    body = labels == BODY
    base = np.empty(labels.shape + (3,), dtype=np.float32)
    base[:] = c2
    base[body] = c1
    base[body & pattern_mask(spec.pattern, labels.shape, scale, body)] = c2
    if region is not None:
        if region_color not in PALETTE:
            raise ValueError(f"region_color: unknown colour {region_color!r}")
        base[region] = np.array(PALETTE[region_color], dtype=np.float32)
    rgb = base * _shade(labels)[..., None]
    rgb[labels == 0] = 0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def pose_array(arr: np.ndarray, angle: float, flip: bool) -> np.ndarray:
    if flip:
        arr = arr[:, ::-1]
    if angle == 0:
        return np.ascontiguousarray(arr)
    img = Image.fromarray(np.ascontiguousarray(arr))
    return np.asarray(img.rotate(angle, resample=Image.Resampling.NEAREST, expand=True))


def render_object(spec: IdentitySpec, scale: float, angle: float = 0.0, flip: bool = False,
                  region: str | None = None, region_color: str | None = None) -> RenderedObject:
    """Draw, colour and pose one object (angle in degrees, counter-clockwise)."""
    labels = np.asarray(draw_labels(spec, scale))
    edit = region_mask(spec, region, labels) if region is not None else None
    rgb = colorize(spec, labels, scale, edit, region_color)
    posed_labels = pose_array(labels, angle, flip)
    posed_rgb = pose_array(rgb, angle, flip)
    posed_region = None
    if edit is not None:
        posed_region = pose_array(edit.astype(np.uint8), angle, flip) > 0
    return RenderedObject(posed_rgb, posed_labels, posed_region)


@functools.lru_cache(maxsize=8192)
def reference_geometry(spec: IdentitySpec) -> tuple[float, float, float]:
    """(area, width, height) of the unposed object at REFERENCE_SCALE, in pixels."""
    mask = np.asarray(draw_labels(spec, REFERENCE_SCALE)) > 0
    ys, xs = np.nonzero(mask)
    return float(mask.sum()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)


def scale_for_area(spec: IdentitySpec, area_px: float) -> float:
    """Scale (px per unit) at which the unposed object covers about `area_px` pixels."""
    area, _, _ = reference_geometry(spec)
    return REFERENCE_SCALE * math.sqrt(area_px / area)


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a boolean mask, exclusive ends; ValueError when empty."""
    ys = np.nonzero(mask.any(axis=1))[0]
    xs = np.nonzero(mask.any(axis=0))[0]
    if not ys.size:
        raise ValueError("mask: empty, no bounding box")
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def top_left(obj: RenderedObject, cx: float, cy: float) -> tuple[int, int]:
    """Canvas position that puts the canvas centre at (cx, cy)."""
    h, w = obj.labels.shape
    return int(math.floor(cx - w / 2.0 + 0.5)), int(math.floor(cy - h / 2.0 + 0.5))


def paste(image: np.ndarray, obj: RenderedObject, x0: int, y0: int,
          clip: tuple[int, int, int, int] | None = None):
    """Copy of `image` with the object pasted at canvas position (x0, y0).

    Returns (image, mask, region) as full-size arrays; the object is clipped to the image and,
    when given, to `clip` = (x0, y0, x1, y1).
    """
    H, W = image.shape[:2]
    lx0, ly0, lx1, ly1 = clip if clip is not None else (0, 0, W, H)
    h, w = obj.labels.shape
    ax0, ay0 = max(x0, lx0), max(y0, ly0)
    ax1, ay1 = min(x0 + w, lx1), min(y0 + h, ly1)
    out = image.copy()
    mask = np.zeros((H, W), dtype=bool)
    region = np.zeros((H, W), dtype=bool)
    if ax0 < ax1 and ay0 < ay1:
        src = (slice(ay0 - y0, ay1 - y0), slice(ax0 - x0, ax1 - x0))
        dst = (slice(ay0, ay1), slice(ax0, ax1))
        m = obj.labels[src] > 0
        mask[dst] = m
        out[dst][m] = obj.rgb[src][m]
        if obj.region is not None:
            region[dst] = obj.region[src] & m
    return out, mask, region
