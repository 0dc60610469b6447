"""Photo backgrounds (nearid/synth/photos.py, synth/backgrounds.py) and the visibility re-draw
(synth/visibility.py). The photos come the way production gets them: the installed package when
there is one, else the pinned scikit-image wheel from the shared cache or a pip download."""
from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nearid.synth import photos as P
from nearid.synth.spec import random_spec
from nearid.synth.variation import changed_attributes, perturb
from nearid.synth.visibility import MAX_REDRAWS, visible_near_identity, visible_share
from nearid.synth.world import SynthWorld

ENV = ("NEARID_PRETRAINED_DOWNLOAD", "NEARID_PRETRAINED_FALLBACK", P.ENV_SKIMAGE_WHEEL)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(P, "_LOADED", {})


def _without_skimage(monkeypatch):
    """The machine as if scikit-image were not installed (CI's is not: this is its state)."""
    real = P._package_dir
    monkeypatch.setattr(P, "_package_dir", lambda pkg: None if pkg == "skimage" else real(pkg))


@pytest.fixture(scope="session")
def skimage_wheel() -> Path:
    """The pinned wheel through the production path (shared cache, else pip download)."""
    P._skimage_wheel([p for p in P.PHOTOS if p.package == "skimage"], None, True)
    from nearid.backbones.dinov2_convert import cache_root
    return sorted((cache_root() / "wheels").glob(P.SKIMAGE_WHEEL_GLOB))[0]


@pytest.mark.timeout(600)
def test_every_pinned_photo_loads_and_matches_its_checksum(skimage_wheel, monkeypatch):
    _without_skimage(monkeypatch)
    library = P.load_photos()
    assert [p.name for p, _ in library] == [p.name for p in P.PHOTOS]
    for photo, pixels in library:
        assert pixels.dtype == np.uint8 and pixels.ndim == (3 if photo.colour else 2), photo.name
        assert min(pixels.shape[:2]) >= 150 and pixels.std() > 10, photo.name
    notice = (Path(__file__).resolve().parent.parent / "NOTICE").read_text()
    for line in P.notice_table().splitlines()[2:]:
        assert line in notice, f"NOTICE lacks {line!r}"


@pytest.mark.timeout(600)
def test_a_tampered_photo_is_refused_naming_the_member(skimage_wheel, monkeypatch, tmp_path):
    _without_skimage(monkeypatch)
    bad = tmp_path / skimage_wheel.name
    with zipfile.ZipFile(skimage_wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:-10] + b"0" * 10 if item.filename.endswith("data/coffee.png") else data)
    monkeypatch.setenv(P.ENV_SKIMAGE_WHEEL, str(bad))
    with pytest.raises(P.PhotosUnavailable, match=r"data/coffee.png has sha256 [0-9a-f]{64}, not the pinned"):
        P.load_photos()


def test_no_photos_falls_back_to_procedural_backgrounds_with_one_warning(monkeypatch, tmp_path, caplog):
    _without_skimage(monkeypatch)
    monkeypatch.setenv("NEARID_CACHE", str(tmp_path))          # no cached wheel
    monkeypatch.setenv("NEARID_PRETRAINED_DOWNLOAD", "0")       # no registry
    world = SynthWorld(seed=1, n_identities=4, resolution=64, backgrounds="photo")
    with caplog.at_level(logging.WARNING, logger="nearid.synth"):
        assert world.backgrounds_used == "procedural"
        img, _ = world.render_view(world.ids()[0], 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and P.ENV_SKIMAGE_WHEEL in warnings[0], warnings
    procedural = SynthWorld(seed=1, n_identities=4, resolution=64)
    assert np.array_equal(np.asarray(img), np.asarray(procedural.render_view(procedural.ids()[0], 0)[0]))
    monkeypatch.setenv("NEARID_PRETRAINED_FALLBACK", "0")
    with pytest.raises(P.PhotosUnavailable, match="downloading is disabled"):
        SynthWorld(seed=1, n_identities=4, resolution=64, backgrounds="photo").backgrounds_used


@pytest.mark.timeout(600)
def test_photo_world_is_seeded_and_its_backgrounds_are_distinct(skimage_wheel):
    world = SynthWorld(seed=5, n_identities=30, resolution=64, backgrounds="photo")
    assert world.backgrounds_used == "photo"
    ids = world.ids()
    again = SynthWorld(seed=5, n_identities=30, resolution=64, backgrounds="photo")
    a, b = world.render_view(ids[3], 1), again.render_view(ids[3], 1)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and np.array_equal(np.asarray(a[1]), np.asarray(b[1]))
    digests = {hashlib.sha256(world.background(i, v).tobytes()).hexdigest() for i in ids for v in range(3)}
    assert len(digests) == 90
    procedural = SynthWorld(seed=5, n_identities=30, resolution=64)
    assert not np.array_equal(np.asarray(world.background(ids[0], 0)), np.asarray(procedural.background(ids[0], 0)))
    # a crop of a photo: some pixel pairs far apart in colour (not a flat or muted fill)
    spread = [np.asarray(world.background(i, 0), np.float32).std() for i in ids]
    assert np.median(spread) > 15, spread


def test_visible_share_known_answers():
    spec = random_spec(np.random.default_rng(0))
    assert visible_share(spec, spec, 64) == 0.0
    colour = next(perturb(spec, s, n_changes=1) for s in range(200)
                  if changed_attributes(spec, perturb(spec, s, n_changes=1)) == ["color1"])
    # a body colour swap moves most of the object's pixels: about the object's area (0.25)
    assert 0.1 < visible_share(spec, colour, 64, area=0.25) <= 0.3


def test_invisible_look_alikes_are_redrawn():
    """Over many identities: with the threshold every kept look-alike is at least that visible,
    some draws needed a re-draw, and without it (min_share 0) the first draw is kept."""
    shares, redraws = [], 0
    for i in range(150):
        spec = random_spec(np.random.default_rng(i))
        first = perturb(spec, i, n_changes=1, closeness=1.0)
        kept, n = visible_near_identity(spec, i, n_changes=1, closeness=1.0, res=64, min_share=0.02)
        assert n < MAX_REDRAWS
        assert (kept == first) == (n == 0)
        redraws += n > 0
        shares.append(visible_share(spec, kept, 64))
        assert visible_near_identity(spec, i, n_changes=1, closeness=1.0, res=64, min_share=0.0) == (first, 0)
    assert min(shares) >= 0.02 and 0 < redraws < 75


def test_prompts_and_the_generate_stage_use_the_visibility_threshold():
    from nearid.config import load_config
    from nearid.generate.prompts import near_identity_prompt
    from nearid.stages.generate import visibility_of
    from nearid.synth.grammar import describe, parse

    worst = []
    for i in range(60):
        spec = random_spec(np.random.default_rng(1000 + i))
        kept = parse(near_identity_prompt(spec.category, describe(spec), seed=i, n_changes=1,
                                          visible_at=64, area=0.25, min_share=0.03))
        worst.append(visible_share(spec, kept, 64, 0.25))
        three = parse(near_identity_prompt(spec.category, describe(spec), seed=i, n_changes=3))
        assert len(changed_attributes(spec, three)) == 3
    assert min(worst) >= 0.03
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs/local.yaml", ["synth.min_visible_share=0.02", "synth.resolution=96",
                                                    "synth.area_range=[0.2, 0.4]"])
    assert visibility_of(cfg.synth) == {"visible_at": 96, "area": pytest.approx(0.3), "min_share": 0.02}
    assert visibility_of(load_config(root / "configs/local.yaml", ["synth.min_visible_share=0"]).synth) == {}
