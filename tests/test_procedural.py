"""The procedural inpainting backend and near-identity prompts."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nearid.generate.procedural import ProceduralBackend, erase
from nearid.generate.prompts import near_identity_prompt
from nearid.synth import SynthWorld, describe, parse
from nearid.synth.render import bbox
from nearid.synth.variation import changed_attributes


@pytest.fixture(scope="module")
def world() -> SynthWorld:
    return SynthWorld(seed=11, n_identities=10, resolution=96)


def test_erase_known_answer_fills_from_the_surroundings():
    img = np.zeros((20, 20, 3), dtype=np.uint8)
    img[:, :10] = (200, 0, 0)
    img[:, 10:] = (0, 0, 200)
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:12, 2:7] = True  # inside the red half: must come back pure red
    img_obj = img.copy()
    img_obj[mask] = (0, 255, 0)
    out = erase(img_obj, mask)
    assert np.array_equal(out, img)
    mask2 = np.zeros((20, 20), dtype=bool)
    mask2[8:12, 8:12] = True  # straddles the edge: left columns red-ish, right columns blue-ish
    out2 = erase(img, mask2)
    assert out2[10, 8, 0] > out2[10, 8, 2] and out2[10, 11, 2] > out2[10, 11, 0]
    assert np.array_equal(out2[~mask2], img[~mask2])


def test_output_equals_input_outside_the_mask_bbox(world):
    backend = ProceduralBackend()
    ids = world.ids()[:6]
    images, masks, prompts = [], [], []
    for id in ids:
        img, mask = world.render_view(id, 1)
        images.append(img)
        masks.append(mask)
        prompts.append("a photo of " + describe(world.distractor_spec(id)))
    outs = backend.inpaint(images, masks, prompts, list(range(6)))
    assert len(outs) == 6
    for img, mask, out in zip(images, masks, outs):
        assert out.size == img.size and out.mode == "RGB"
        a, b, m = np.asarray(img), np.asarray(out), np.asarray(mask) > 0
        x0, y0, x1, y1 = bbox(m)
        outside = np.ones_like(m)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(a[outside], b[outside])
        assert (a[m] != b[m]).any(axis=1).mean() > 0.2
    again = backend.inpaint(images[:1], masks[:1], prompts[:1], [0])[0]
    assert np.array_equal(np.asarray(again), np.asarray(outs[0]))


def test_rendered_object_carries_the_prompt_colour(world):
    id = world.ids()[0]
    img, mask = world.render_view(id, 0)
    spec = world.identity(id)
    other = "white" if "white" not in (spec.color1, spec.color2) else "green"
    prompt = describe(type(spec)(spec.category, spec.shape, other, spec.color2, "solid", spec.parts))
    out = np.asarray(ProceduralBackend().inpaint([img], [mask], [prompt], [3])[0]).astype(int)
    from nearid.synth.spec import PALETTE
    near = (np.abs(out - np.array(PALETTE[other])).sum(axis=2) < 40)[np.asarray(mask) > 0]
    assert near.mean() > 0.1


def test_errors_become_value_errors():
    backend = ProceduralBackend(steps=30)  # diffusion settings are accepted and ignored
    assert backend.ignored_params == {"steps": 30} and backend.name == "procedural"
    img = Image.new("RGB", (32, 32), (10, 20, 30))
    full = Image.new("L", (32, 32), 0)
    full.paste(255, (8, 8, 20, 20))
    with pytest.raises(ValueError, match="prompt"):
        backend.inpaint([img], [full], ["a cat on a sofa"], [0])
    with pytest.raises(ValueError, match="empty"):
        backend.inpaint([img], [Image.new("L", (32, 32), 0)], ["a red mug with blue dots, "
                        "regular mid-height straight body, with handle"], [0])
    with pytest.raises(ValueError, match="lengths"):
        backend.inpaint([img], [full], [], [0])


# ---- prompts -----------------------------------------------------------------------------------
def test_near_identity_prompt_swaps_attributes_deterministically():
    desc = "a red mug with blue stripes, wide mid-height straight body, with handle and lid"
    spec = parse(desc)
    for seed in range(40):
        for n in (1, 2):
            out = near_identity_prompt("mug", desc, seed=seed, n_changes=n)
            assert out == near_identity_prompt("mug", desc, seed=seed, n_changes=n)
            assert len(changed_attributes(spec, parse(out))) == n
    outs = {near_identity_prompt("mug", desc, seed=s) for s in range(40)}
    assert len(outs) > 10
    wrapped = near_identity_prompt("mug", desc, seed=1, template="a photo of {description}")
    assert wrapped == "a photo of " + near_identity_prompt("mug", desc, seed=1)


def test_near_identity_prompt_vocab_and_fallback():
    desc = "a red mug with blue stripes, wide mid-height straight body, with handle and lid"
    vocab = {"mug": {"colors": ["red", "blue"], "patterns": ["dots"], "parts": []}}
    for seed in range(30):
        new = parse(near_identity_prompt("mug", desc, seed=seed, vocab=vocab))
        changed = changed_attributes(parse(desc), new)
        assert changed in (["pattern"], ["shape"])
        if changed == ["pattern"]:
            assert new.pattern == "dots"
    with pytest.raises(ValueError, match="polka"):
        near_identity_prompt("mug", desc, seed=0, vocab={"mug": {"patterns": ["polka"]}})
    free = "a chipped ceramic cup with a gold rim"
    assert near_identity_prompt("mug", free, seed=0) == \
        "a different mug that looks similar to: a chipped ceramic cup with a gold rim"
    assert near_identity_prompt("mug", free, seed=0, template="a photo of {description}") == \
        "a photo of a different mug that looks similar to: a chipped ceramic cup with a gold rim"
