"""Mask utilities for distractor generation: validation, dilation, exact compositing, edges.

Conventions: a mask is a PIL image where white (>= 128 after conversion to "L") marks the
region to inpaint (the object), black the background to keep. Every function returns binary
masks (values 0 or 255, mode "L") so later steps never see anti-aliased grey values.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

# A mask pixel counts as "ambiguous grey" when it is this far from both 0 and 255.
_GREY_MARGIN = 32
# Anti-aliased edges are fine; a mask with more ambiguous pixels than this is not a mask.
_MAX_GREY_FRACTION = 0.05


def _to_binary_array(mask: Image.Image) -> np.ndarray:
    """Boolean array (H, W), True = inpaint region; threshold at 128 after conversion to L."""
    return np.asarray(mask.convert("L")) >= 128


def _from_binary_array(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(array, 255, 0).astype(np.uint8), mode="L")


def check_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Validate a mask against an image of `size` (width, height); return it binarised ("L", 0/255).

    Raises ValueError naming the problem: not a PIL image or of an unconvertible mode, wrong
    size, too many ambiguous grey pixels to call it binary, or empty (all black).
    """
    if not isinstance(mask, Image.Image):
        raise ValueError(f"mask must be a PIL.Image, got {type(mask).__name__}")
    if tuple(mask.size) != tuple(size):
        raise ValueError(f"mask size {mask.size} does not match image size {tuple(size)}")
    try:
        grey = np.asarray(mask.convert("L"))
    except (ValueError, OSError) as error:
        raise ValueError(f"mask mode {mask.mode!r} cannot be converted to a binary mask: {error}") from error
    ambiguous = (grey > _GREY_MARGIN) & (grey < 255 - _GREY_MARGIN)
    if ambiguous.mean() > _MAX_GREY_FRACTION:
        raise ValueError(
            f"mask is not binary: {ambiguous.mean():.1%} of pixels are grey "
            f"(between {_GREY_MARGIN} and {255 - _GREY_MARGIN}); at most {_MAX_GREY_FRACTION:.0%} allowed"
        )
    binary = grey >= 128
    if not binary.any():
        raise ValueError("mask is empty (all black): nothing to inpaint")
    return _from_binary_array(binary)


def _max_filter_1d(array: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Sliding-window maximum of width 2*radius+1 along `axis` (edges padded with False)."""
    pad = [(0, 0)] * array.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(array, pad, mode="constant", constant_values=False)
    length = array.shape[axis]
    result = np.zeros_like(array)
    for offset in range(2 * radius + 1):
        result |= np.take(padded, np.arange(offset, offset + length), axis=axis)
    return result


def dilate_mask(mask: Image.Image, pixels: int) -> Image.Image:
    """Binary dilation by `pixels` with a square (2*pixels+1)^2 structuring element.

    Dilation gives the inpainting model room around the object's silhouette, so the new
    object is not forced into the old outline. The square kernel is separable (two 1-D passes),
    which keeps large radii cheap on megapixel masks.
    """
    if pixels < 0:
        raise ValueError(f"pixels must be >= 0, got {pixels}")
    binary = _to_binary_array(mask)
    if pixels > 0:
        binary = _max_filter_1d(_max_filter_1d(binary, pixels, axis=0), pixels, axis=1)
    return _from_binary_array(binary)


def composite(source: Image.Image, generated: Image.Image, mask_dilated: Image.Image) -> Image.Image:
    """Paste `generated` into `source` inside the mask; outside it the result IS the source.

    `generated` is resized to the source size first (models run at their own resolution).
    The result has the source's mode, and pixels outside the (binarised) mask are copied
    byte for byte, so the distractor sits in the view's exact background.
    """
    if mask_dilated.size != source.size:
        raise ValueError(f"mask size {mask_dilated.size} does not match source size {source.size}")
    if generated.size != source.size:
        generated = generated.resize(source.size, Image.Resampling.LANCZOS)
    source_array = np.asarray(source)
    generated_array = np.asarray(generated.convert(source.mode))
    inside = _to_binary_array(mask_dilated)
    if source_array.ndim == 3:
        inside = inside[..., None]
    return Image.fromarray(np.where(inside, generated_array, source_array), mode=source.mode)


def validate_distractor(source: Image.Image, distractor: Image.Image, mask_dilated: Image.Image) -> dict:
    """Check a distractor against its source view.

    Returns `outside_equal` (every pixel outside the mask equals the source exactly) and
    `inside_changed_frac` (fraction of mask pixels where any channel differs; 0.0 for an
    empty mask), the two facts the distractor contract relies on.
    """
    if distractor.size != source.size:
        raise ValueError(f"distractor size {distractor.size} does not match source size {source.size}")
    if mask_dilated.size != source.size:
        raise ValueError(f"mask size {mask_dilated.size} does not match source size {source.size}")
    source_array = np.asarray(source.convert("RGB")).astype(np.int16)
    distractor_array = np.asarray(distractor.convert("RGB")).astype(np.int16)
    changed = (source_array != distractor_array).any(axis=-1)
    inside = _to_binary_array(mask_dilated)
    inside_count = int(inside.sum())
    return {
        "outside_equal": not bool(changed[~inside].any()),
        "inside_changed_frac": float(changed[inside].sum() / inside_count) if inside_count else 0.0,
    }


def canny_edges(image: Image.Image, low: float = 0.1, high: float = 0.2, blur: float = 1.0) -> Image.Image:
    """Canny-style edge map ("L", 0/255) with numpy/PIL only (no OpenCV here).

    Gaussian blur, Sobel gradients, non-maximum suppression along the gradient direction
    (4 sectors), then double threshold with one-step hysteresis: weak edges survive only next
    to strong ones. `low`/`high` are fractions of the largest gradient magnitude, so the
    result does not depend on image contrast. Used as the FLUX Canny control image.
    """
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    grey = image.convert("L")
    if blur > 0:
        grey = grey.filter(ImageFilter.GaussianBlur(blur))
    array = np.pad(np.asarray(grey, dtype=np.float32), 1, mode="edge")
    # Sobel via shifted slices: p[dy][dx] is the neighbour at (dy-1, dx-1).
    p = [[array[dy : dy + array.shape[0] - 2, dx : dx + array.shape[1] - 2] for dx in range(3)] for dy in range(3)]
    gx = (p[0][2] + 2 * p[1][2] + p[2][2]) - (p[0][0] + 2 * p[1][0] + p[2][0])
    gy = (p[2][0] + 2 * p[2][1] + p[2][2]) - (p[0][0] + 2 * p[0][1] + p[0][2])
    magnitude = np.hypot(gx, gy)
    peak = float(magnitude.max())
    if peak == 0.0:
        return Image.new("L", image.size, 0)
    thin = _non_max_suppression(magnitude, gx, gy)
    strong = thin >= high * peak
    weak = thin >= low * peak
    near_strong = _max_filter_1d(_max_filter_1d(strong, 1, axis=0), 1, axis=1)
    return _from_binary_array(strong | (weak & near_strong))


def _non_max_suppression(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a pixel only where its magnitude is >= both neighbours along the gradient."""
    padded = np.pad(magnitude, 1, mode="constant")
    height, width = magnitude.shape

    def neighbour(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector_offsets = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    sector = (((angle + 22.5) // 45) % 4).astype(np.int64)
    keep = np.zeros_like(magnitude, dtype=bool)
    for index, (a, b) in enumerate(sector_offsets):
        selected = sector == index
        keep |= selected & (magnitude >= neighbour(*a)) & (magnitude >= neighbour(*b))
    return np.where(keep, magnitude, 0.0)
