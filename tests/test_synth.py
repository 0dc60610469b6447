"""The synthetic NearID world: grammar, determinism, splits, renders, distractors, MTG, graded."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from nearid.synth import CATEGORIES, IdentitySpec, SynthWorld, describe, parse, random_spec
from nearid.synth.variation import changed_attributes, perturb


def _arr(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.fixture(scope="module")
def world() -> SynthWorld:
    return SynthWorld(seed=7, n_identities=40, resolution=96, split_sizes=(30, 5, 5))


# ---- grammar ------------------------------------------------------------------------------------
def test_describe_known_answer():
    spec = IdentitySpec("mug", (1.2, 1.0, 0.0), "red", "blue", "stripes", ("handle", "lid"))
    assert describe(spec) == "a red mug with blue stripes, wide mid-height straight body, with handle and lid"
    spec = IdentitySpec("lamp", (0.8, 1.2, -0.25), "orange", "black", "solid", ())
    assert describe(spec) == "an orange lamp with black trim, slim tall flared body, with no extras"
    spec = IdentitySpec("lamp", (0.8, 0.8, 0.25), "teal", "white", "diagonal",
                        ("finial", "tassels", "wide_base"))
    assert describe(spec) == ("a teal lamp with white diagonal stripes, slim short tapered body, "
                              "with finial, tassels and wide base")


def test_grammar_round_trip_many_random_specs():
    rng = np.random.default_rng(0)
    specs = [random_spec(rng) for _ in range(1500)]
    for spec in specs:
        text = describe(spec)
        assert parse(text) == spec, text
        assert parse("A photo of " + text.upper() + ".") == spec
        assert IdentitySpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert {s.category for s in specs} == set(CATEGORIES)


@pytest.mark.parametrize("text, bad", [
    ("a reed mug with blue stripes, wide mid-height straight body, with handle", "reed"),
    ("a red mog with blue stripes, wide mid-height straight body, with handle", "mog"),
    ("a red mug with blue plaid, wide mid-height straight body, with handle", "plaid"),
    ("a red mug with blue stripes, huge mid-height straight body, with handle", "huge"),
    ("a red mug with blue stripes, wide mid-height straight body, with handle and wheels", "wheels"),
    ("the red mug with blue stripes, wide mid-height straight body, with handle", "the"),
    ("a red mug with red stripes, wide mid-height straight body, with handle", "color2"),
])
def test_parse_errors_name_the_bad_token(text, bad):
    with pytest.raises(ValueError, match=bad):
        parse(text)


def test_spec_validation_names_field():
    with pytest.raises(ValueError, match="shape"):
        IdentitySpec("mug", (1.1, 1.0, 0.0), "red", "blue", "dots", ())
    with pytest.raises(ValueError, match="parts"):
        IdentitySpec("mug", (1.0, 1.0, 0.0), "red", "blue", "dots", ("lid", "handle"))
    with pytest.raises(ValueError, match="unexpected keys"):
        IdentitySpec.from_dict({**IdentitySpec("mug", (1.0, 1.0, 0.0), "red", "blue", "dots").to_dict(),
                                "size": 3})


# ---- near identities ----------------------------------------------------------------------------
def test_near_identity_changes_the_requested_attributes():
    rng = np.random.default_rng(1)
    close, far = SynthWorld(n_identities=4, closeness=1.0), SynthWorld(n_identities=4, closeness=0.0)
    for k in range(300):
        spec = random_spec(rng)
        assert len(changed_attributes(spec, close.near_identity(spec, k))) == 1
        assert len(changed_attributes(spec, far.near_identity(spec, k))) == 2
        for n in (1, 2, 3, 4, 5):
            assert len(changed_attributes(spec, perturb(spec, k, n_changes=n))) == n
    spec = random_spec(rng)
    assert close.near_identity(spec, 5) == close.near_identity(spec, 5)


# ---- world --------------------------------------------------------------------------------------
def test_determinism_byte_identical_across_instances():
    ids = ["syn-000000", "syn-000011"]
    a = list(SynthWorld(seed=3, n_identities=12).positives_rows(ids))
    b = list(SynthWorld(seed=3, n_identities=12).positives_rows(reversed(ids)))
    b = sorted(b, key=lambda r: (r["id"] != ids[0], r["view"]))
    assert [r["image"] for r in a] == [r["image"] for r in b]
    assert [r["mask"] for r in a] == [r["mask"] for r in b]
    c = list(SynthWorld(seed=4, n_identities=12).positives_rows(ids))
    assert [r["image"] for r in a] != [r["image"] for r in c]


def test_split_assignment_counts_stable_and_separate_streams():
    w = SynthWorld(seed=1, n_identities=100, split_sizes=(0.8, 0.1, 0.1))
    splits = [w.split_of(i) for i in w.ids()]
    assert splits == ["train"] * 80 + ["val"] * 10 + ["test"] * 10
    again = SynthWorld(seed=1, n_identities=100)
    assert [again.split_of(i) for i in again.ids()] == splits
    assert [again.identity(i) for i in again.ids()] == [w.identity(i) for i in w.ids()]
    # Held-out identities come from another stream: index 95 as "train" is a different object.
    all_train = SynthWorld(seed=1, n_identities=100, split_sizes=(100, 0, 0))
    test_ids = w.ids()[90:]
    assert sum(w.identity(i) != all_train.identity(i) for i in test_ids) >= 9
    assert w.identity(w.ids()[0]) == all_train.identity(w.ids()[0])
    with pytest.raises(ValueError, match="split_sizes"):
        SynthWorld(n_identities=10, split_sizes=(5, 2, 2))
    with pytest.raises(ValueError, match="syn-000100"):
        w.split_of("syn-000100")


def test_positives_rows_schema_masks_and_area(world):
    rows = list(world.positives_rows(world.ids()[:12]))
    assert len(rows) == 36
    expected = {"id": str, "view": int, "split": str, "category": str, "description": str,
                "prompt": str, "image": bytes, "mask": bytes}
    for row in rows:
        assert set(row) == set(expected)
        for key, typ in expected.items():
            assert isinstance(row[key], typ), key
        assert row["prompt"] == "a photo of " + row["description"]
        assert parse(row["description"]) == world.identity(row["id"])
        img, mask = _arr(row["image"]), _arr(row["mask"])
        assert img.shape == (96, 96, 3) and mask.shape == (96, 96)
        assert set(np.unique(mask)) == {0, 255}
        frac = (mask > 0).mean()
        assert 0.12 <= frac <= 0.38, (row["id"], row["view"], frac)
    assert [r["view"] for r in rows[:3]] == [0, 1, 2]


def test_views_have_different_backgrounds_and_object_is_pasted_on_them(world):
    id = world.ids()[3]
    bgs = [np.asarray(world.background(id, v)) for v in range(3)]
    assert not np.array_equal(bgs[0], bgs[1]) and not np.array_equal(bgs[1], bgs[2])
    for v in range(3):
        img, mask = world.render_view(id, v)
        img, mask = np.asarray(img), np.asarray(mask) > 0
        assert np.array_equal(img[~mask], bgs[v][~mask])
        assert not np.array_equal(img[mask], bgs[v][mask])


def test_distractor_differs_from_positive_only_inside_the_masks(world):
    for id in world.ids()[:8]:
        spec = world.distractor_spec(id)
        assert spec.category == world.identity(id).category and spec != world.identity(id)
        for v in range(3):
            pos, pmask = (np.asarray(x) for x in world.render_view(id, v))
            dis, dmask = (np.asarray(x) for x in world.render_distractor(id, v, spec))
            changed = (pos != dis).any(axis=2)
            assert changed.any()
            assert not (changed & ~((pmask > 0) | (dmask > 0))).any()
    # The identity rendered as its own distractor is the positive itself.
    id = world.ids()[0]
    same, _ = world.render_distractor(id, 1, world.identity(id))
    assert np.array_equal(np.asarray(same), np.asarray(world.render_view(id, 1)[0]))


def test_mtg_oracle_matches_part_and_object_areas(world):
    rows = list(world.mtg_rows(world.ids()[:10]))
    assert len(rows) == 10
    for row in rows:
        for k in (1, 2):
            part, obj = row[f"part_area_{k}"], row[f"object_area_{k}"]
            assert 0 < part < obj
            assert row[f"oracle{k}"] == pytest.approx(1 - part / obj)
            changed = (_arr(row[f"image_{k}"]) != _arr(row[f"image_{k}p"])).any(axis=2)
            assert int(changed.sum()) == part  # the edit touches exactly the part region
    positive = next(world.positives_rows([rows[0]["id"]]))
    assert rows[0]["image_1"] == positive["image"]


def test_graded_ratings_fall_with_distance(world):
    rows = list(world.graded_rows(world.ids(), n_variants=4))
    assert len(rows) == 160
    assert len({r["method"] for r in rows}) == 7
    d = np.array([r["distance"] for r in rows])
    for key in ("rating_g1", "rating_g2"):
        r = np.array([row[key] for row in rows])
        assert r.min() >= 0 and r.max() <= 4
        assert r[d <= 1].mean() > r[d >= 3].mean() + 1.0
        assert np.corrcoef(d, r)[0, 1] < -0.5
    g1, g2 = (np.array([row[k] for row in rows]) for k in ("rating_g1", "rating_g2"))
    assert not np.array_equal(g1, g2)
    by_method = {m: np.mean([r["distance"] for r in rows if r["method"] == m]) for m in
                 ("sim_dreambooth", "sim_textual_inversion")}
    assert by_method["sim_dreambooth"] < by_method["sim_textual_inversion"]
    row = rows[0]
    assert row["reference"] == next(world.positives_rows([row["id"]]))["image"]
