"""Krippendorff's alpha beside Pearson in `nearid mh`: known answers computed by hand here.

The hand computation is Krippendorff's coincidence-matrix formula for interval data, written out
with numpy (independently of the `krippendorff` package the CLI calls):

    o_ck = sum over units u of (number of ordered pairs (c, k) of values in u) / (m_u - 1)
    n_c  = sum_k o_ck,  n = sum_c n_c
    D_o  = sum_ck o_ck (c - k)^2 / n,   D_e = sum_ck n_c n_k (c - k)^2 / (n (n - 1))
    alpha = 1 - D_o / D_e
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nearid import cli
from nearid.benchmarks.dreambench_mh import mh_scores
from nearid.benchmarks.dreambench_ratings import interval_alpha, to_human_scale

HUMAN = Path("data_human_rating") / "merged_data"


def hand_alpha(data) -> float:
    """Interval alpha of a raters x units matrix (NaN = no value) by the coincidence matrix."""
    data = np.asarray(data, dtype=np.float64)
    values = np.unique(data[~np.isnan(data)])
    o = np.zeros((len(values), len(values)))
    for unit in data.T:
        present = unit[~np.isnan(unit)]
        m = len(present)
        if m < 2:
            continue                                  # unpairable unit: contributes nothing
        idx = np.searchsorted(values, present)
        for i in range(m):
            for j in range(m):
                if i != j:
                    o[idx[i], idx[j]] += 1.0 / (m - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    delta2 = (values[:, None] - values[None, :]) ** 2
    d_o = (o * delta2).sum() / n
    d_e = (np.outer(n_c, n_c) * delta2).sum() / (n * (n - 1))
    return float(1.0 - d_o / d_e)


def test_hand_formula_and_package_agree_on_the_published_example():
    # Krippendorff's worked example (4 coders, 12 units, missing values), as in the package's docs
    nan = np.nan
    data = [[1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
            [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
            [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
            [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan]]
    assert hand_alpha(data) == pytest.approx(0.849, abs=5e-4)   # Krippendorff (2011): interval 0.849
    import krippendorff

    assert krippendorff.alpha(reliability_data=data, level_of_measurement="interval") == \
        pytest.approx(hand_alpha(data), abs=1e-12)
    # two raters, our wrapper
    a, b = [0, 1, 2, 4, 3], [0, 2, 2, 3, 3]
    assert interval_alpha(a, b) == pytest.approx(hand_alpha([a, b]), abs=1e-12)
    assert math.isnan(interval_alpha([2, 2], [2, 2]))           # one value: alpha undefined


def test_scorer_goes_to_the_human_scale_by_mean_and_sd():
    human = np.array([0, 1, 3, 4, 1, 3], dtype=float)          # mean 2, population sd sqrt(2)
    t = np.array([4, 0, 3, 1, 3, 1], dtype=float)               # a permutation: same mean, same sd
    assert to_human_scale(17.5 * t - 3.0, human) == pytest.approx(t, abs=0)
    # off-grid values are rounded to 0.05 of a rating point; a constant scorer maps to the mean
    z = np.array([-1.0, 1.0])                                   # mean 0, sd 1 -> 2 -+ 1.4142
    assert to_human_scale(z, human).tolist() == [0.6, 3.4]      # 0.5858, 3.4142 on the grid
    assert to_human_scale(np.array([5.0, 5.0]), human).tolist() == [2.0, 2.0]


# A ratings folder built here: 2 methods x (4 object + 3 style prompts). Within each category,
# group2 and the scorer's targets t are permutations of group1's values over both methods, so
# mean and sd match and the scorer maps back to t exactly (no rounding involved).
G1 = {"emu2": {"object": [0, 1, 3, 4], "style": [1, 2, 4]},
      "blip_diffusion": {"object": [2, 2, 4, 0], "style": [0, 3, 3]}}
G2 = {"emu2": {"object": [1, 0, 4, 2], "style": [2, 1, 3]},
      "blip_diffusion": {"object": [3, 2, 4, 0], "style": [4, 3, 0]}}
T = {"emu2": {"object": [0, 2, 4, 3], "style": [1, 3, 4]},
     "blip_diffusion": {"object": [1, 0, 4, 2], "style": [2, 0, 3]}}
SCALE = {"object": (10.0, 35.0), "style": (0.25, -0.6)}        # scorer = a * t + b, per category
PROMPTS = {"object": ["object_00_cat_toy", "object_01_mug"], "style": ["style_00_ink"]}


def _keys(cat: str, n: int) -> list[str]:
    concepts = PROMPTS[cat]
    return [f"{concepts[i % len(concepts)]}-{i}" for i in range(n)]


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "ratings"
    for m in G1:
        g1, g2, scorer = {}, {}, {}
        for cat in ("object", "style"):
            a, b = SCALE[cat]
            for k, x1, x2, t in zip(_keys(cat, len(G1[m][cat])), G1[m][cat], G2[m][cat], T[m][cat]):
                g1[k], g2[k] = x1, x2
                scorer[f"{k}_0"] = a * t + b
        _write(root / HUMAN / "group1" / f"{m}-cp.json", g1)
        _write(root / HUMAN / "group2" / f"{m}-cp.json", g2)
        _write(root / "data_mine_rating" / f"{m}.json", scorer)
    return root


def _mh_columns(out: str) -> dict[str, dict[str, float]]:
    lines = out.strip().splitlines()
    head = lines[1].split()
    assert head[0] == "scorer"
    rows = {}
    for ln in lines[2:]:
        parts = ln.split()
        if parts[0].startswith("prompts"):
            continue
        assert len(parts) == len(head)
        rows[parts[0]] = dict(zip(head[1:], map(float, parts[1:])))
    return rows


def test_cli_prints_alpha_beside_pearson_known_answer(folder, capsys):
    expected, human = {}, {}
    for cat in ("object", "style"):
        # per method: mean over the two groups of alpha({scorer on the human scale, group g});
        # the category: arithmetic mean over methods
        per_method = [(hand_alpha([T[m][cat], G1[m][cat]]) + hand_alpha([T[m][cat], G2[m][cat]])) / 2
                      for m in G1]
        expected[cat] = float(np.mean(per_method))
        human[cat] = float(np.mean([hand_alpha([G1[m][cat], G2[m][cat]]) for m in G1]))
    # the numbers themselves, so that a change in the hand formula shows too
    # (e.g. style, blip_diffusion: t = [2, 0, 3] vs group1 [0, 3, 3] gives D_o = D_e = 13/3, alpha 0;
    # vs group2 [4, 3, 0] D_o = 22/3, D_e = 28/5, alpha -13/42; the method's value -13/84)
    assert expected == {"object": pytest.approx(0.62982, abs=1e-5), "style": pytest.approx(0.23023, abs=1e-5)}
    assert human == {"object": pytest.approx(0.81182, abs=1e-5), "style": pytest.approx(0.11483, abs=1e-5)}

    assert cli.main(["mh", str(folder)]) == 0
    rows = _mh_columns(capsys.readouterr().out)
    assert set(rows) == {"mine", "human1-vs-human2"}
    assert rows["mine"]["alpha:object"] == pytest.approx(expected["object"], abs=6e-5)
    assert rows["mine"]["alpha:style"] == pytest.approx(expected["style"], abs=6e-5)
    assert rows["human1-vs-human2"]["alpha:object"] == pytest.approx(human["object"], abs=6e-5)
    assert rows["human1-vs-human2"]["alpha:style"] == pytest.approx(human["style"], abs=6e-5)
    # Pearson (M-H) is unchanged and still comes first on the line
    res = mh_scores(folder)
    assert rows["mine"]["object"] == pytest.approx(res["scorers"]["mine"]["object"], abs=6e-5)
    assert list(rows["mine"])[:2] == ["object", "style"]


def test_alpha_sees_a_level_error_that_pearson_cannot(folder, capsys):
    # shift one method's scores up: Pearson within each method is unchanged, agreement is not
    path = folder / "data_mine_rating" / "blip_diffusion.json"
    before = mh_scores(folder)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v + (60.0 if k.startswith("object") else 0.0) for k, v in data.items()}))
    after = mh_scores(folder)
    assert after["scorers"]["mine"] == pytest.approx(before["scorers"]["mine"], abs=1e-12)
    assert after["alpha"]["mine"]["style"] == pytest.approx(before["alpha"]["mine"]["style"], abs=1e-12)
    assert after["alpha"]["mine"]["object"] < before["alpha"]["mine"]["object"] - 0.3


def test_published_ratings_alpha_is_bounded_by_the_human_agreement(capsys):
    real = Path(__file__).resolve().parent / "fixtures" / "dreambench_plus" / "ratings"
    if not (real / HUMAN / "group1").is_dir():
        pytest.skip("reference ratings not vendored")
    res = mh_scores(real)
    for name, cats in res["alpha"].items():
        for cat, a in cats.items():
            assert -1.0 < a < res["human_alpha"][cat], (name, cat, a)
    # DreamBench++ H-H concept-preservation alpha is computed per method over all prompts; here
    # per category, so only its range is checked: the two human groups agree moderately
    assert 0.45 < res["human_alpha"]["object"] < 0.8
