"""Known-answer tests for mask checking, dilation, exact compositing and Canny edges."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from nearid.generate.masks import canny_edges, check_mask, composite, dilate_mask, validate_distractor


def _square_mask(size=(16, 16), box=(4, 4, 12, 12)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)  # box is (left, top, right, bottom), right/bottom exclusive
    return mask


def _noise(size=(16, 16), seed=0) -> Image.Image:
    array = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array)


def test_dilate_single_pixel_gives_square_block():
    mask = Image.new("L", (9, 9), 0)
    mask.putpixel((4, 4), 255)
    out = np.asarray(dilate_mask(mask, 2))
    expected = np.zeros((9, 9), dtype=np.uint8)
    expected[2:7, 2:7] = 255
    np.testing.assert_array_equal(out, expected)


def test_dilate_clips_at_image_border_and_zero_is_binarise():
    mask = Image.new("L", (6, 6), 0)
    mask.putpixel((0, 0), 200)  # >= 128 counts as mask
    mask.putpixel((5, 5), 100)  # < 128 does not
    out = np.asarray(dilate_mask(mask, 1)) > 0
    assert out.sum() == 4 and out[:2, :2].all()
    same = np.asarray(dilate_mask(mask, 0))
    assert set(np.unique(same)) == {0, 255} and (same > 0).sum() == 1


def test_dilate_rejects_negative_radius():
    with pytest.raises(ValueError, match="pixels"):
        dilate_mask(_square_mask(), -1)


def test_composite_keeps_outside_pixels_exactly_and_resizes_generated():
    source = _noise()
    generated = Image.new("RGB", (8, 8), (10, 200, 30))  # other size: resized to 16x16 first
    mask = _square_mask()
    out = composite(source, generated, mask)
    assert out.size == source.size and out.mode == "RGB"
    out_array, src_array = np.asarray(out), np.asarray(source)
    inside = np.asarray(mask) > 0
    np.testing.assert_array_equal(out_array[~inside], src_array[~inside])
    assert (out_array[inside] == [10, 200, 30]).all()


def test_composite_grayscale_source_keeps_mode():
    source = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), mode="L")
    out = composite(source, Image.new("RGB", (16, 16), (255, 255, 255)), _square_mask())
    assert out.mode == "L"
    assert np.asarray(out)[0, 0] == 0 and np.asarray(out)[5, 5] == 255


def test_validate_distractor_counts_changed_inside_and_outside():
    source = _noise()
    mask = _square_mask()  # 8x8 = 64 pixels inside
    array = np.asarray(source).copy()
    array[4:8, 4:12] = 255 - array[4:8, 4:12]  # flip half of the inside (32 pixels) in every channel
    result = validate_distractor(source, Image.fromarray(array), mask)
    assert result == {"outside_equal": True, "inside_changed_frac": 0.5}
    array[0, 0, 1] ^= 1  # one channel of one outside pixel
    assert validate_distractor(source, Image.fromarray(array), mask)["outside_equal"] is False


def test_check_mask_returns_binary_and_accepts_other_modes():
    grey = np.asarray(_square_mask()).copy()
    grey[4, 4] = 140  # one anti-aliased edge pixel is fine
    out = check_mask(Image.fromarray(grey), (16, 16))
    assert out.mode == "L" and set(np.unique(np.asarray(out))) == {0, 255}
    assert (np.asarray(out) > 0).sum() == 64
    assert (np.asarray(check_mask(_square_mask().convert("1"), (16, 16))) > 0).sum() == 64
    assert (np.asarray(check_mask(_square_mask().convert("RGB"), (16, 16))) > 0).sum() == 64


@pytest.mark.parametrize(
    "mask, message",
    [
        (Image.new("L", (16, 16), 0), "empty"),
        (_square_mask(size=(16, 8), box=(0, 0, 4, 4)), "size"),
        (Image.new("L", (16, 16), 128), "not binary"),
        (np.zeros((16, 16)), "PIL"),
    ],
)
def test_check_mask_errors_name_the_problem(mask, message):
    with pytest.raises(ValueError, match=message):
        check_mask(mask, (16, 16))


def test_canny_edges_of_square_lie_on_its_outline():
    image = Image.new("RGB", (48, 48), (20, 20, 20))
    ImageDraw.Draw(image).rectangle([12, 12, 35, 35], fill=(230, 200, 10))  # inclusive: rows/cols 12..35
    edges = np.asarray(canny_edges(image)) > 0
    assert canny_edges(image).mode == "L"
    ys, xs = np.nonzero(edges)
    # Every edge pixel is within 1 pixel of the square's boundary (between 11|12 and 35|36).
    distance = np.minimum.reduce([np.abs(ys - 11.5), np.abs(ys - 35.5), np.abs(xs - 11.5), np.abs(xs - 35.5)])
    assert distance.max() <= 1.5
    assert not edges[16:32, 16:32].any() and not edges[:8].any() and not edges[40:].any()
    # Each side is found along (almost) its whole length.
    for side in (edges[11:13, 14:34].any(axis=0), edges[35:37, 14:34].any(axis=0),
                 edges[14:34, 11:13].any(axis=1), edges[14:34, 35:37].any(axis=1)):
        assert side.mean() >= 0.9


def test_canny_edges_of_flat_image_are_empty():
    assert not np.asarray(canny_edges(Image.new("RGB", (8, 8), (50, 60, 70)))).any()
