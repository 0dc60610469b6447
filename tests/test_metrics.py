"""Known-answer tests for nearid.metrics; every expected value is worked out by hand in comments."""
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from nearid.metrics import (MARGIN_NAMES, PAPER_POOLED_SETTINGS, build_sims, fisher_z_mean, margins,
                            mh_score, mtg_scores, nearid_scores, nearid_table)

NAN = float("nan")


def sims_frame(rows: list[dict]) -> pd.DataFrame:
    cols = ["setting", "sim_01", "sim_02", "sim_12", "cross_00", "cross_11", "cross_22"]
    return pd.DataFrame([{c: r.get(c, NAN) for c in cols} for r in rows])


# ----------------------------------------------------------------------------- SSR / PA
def test_two_view_row():
    # margins: 0.75-0.5=0.25 (win), 0.75-1.0=-0.25 (loss); mean 0 -> extra trial is a loss
    out = nearid_scores(sims_frame([{"sim_01": 0.75, "cross_00": 0.5, "cross_11": 1.0}]))
    assert out["ssr"] == 0.0
    assert out["pa_pure"] == 50.0          # 1 / 2
    assert math.isclose(out["pa"], 100 / 3)  # (1 + 0) / (2 + 1)
    assert (out["n"], out["n_terms"], out["n_excluded"]) == (1, 2, 0)


def test_missing_terms_are_skipped_not_lost():
    # sim_12 and cross_22 absent: only (01,a=0), (01,a=1), (02,a=0) exist, all winning
    row = {"sim_01": 0.9, "sim_02": 0.8, "cross_00": 0.5, "cross_11": 0.5}
    out = nearid_scores(sims_frame([row]))
    assert out["n_terms"] == 3 and out["ssr"] == 100.0 and out["pa_pure"] == 100.0 and out["pa"] == 100.0


def test_margin_of_exactly_zero_is_a_loss():
    out = nearid_scores(sims_frame([{"sim_01": 0.5, "cross_00": 0.5, "cross_11": 0.25}]))
    # margins 0 (loss) and 0.25 (win); mean 0.125 > 0 wins the extra trial
    assert out["ssr"] == 0.0 and out["pa_pure"] == 50.0 and math.isclose(out["pa"], 200 / 3)


def test_rows_without_terms_are_excluded_and_counted():
    rows = [{"sim_01": 0.9, "cross_00": 0.1, "cross_11": 0.1},   # 2 wins
            {"cross_00": 0.1, "cross_11": 0.1, "cross_22": 0.1},  # no view pair: excluded
            {"sim_01": 0.9}]                                      # no distractor: excluded
    out = nearid_scores(sims_frame(rows))
    assert (out["n"], out["n_excluded"], out["ssr"]) == (1, 2, 100.0)


def test_margins_order_and_nan():
    m = margins(sims_frame([{"sim_01": 0.9, "sim_02": 0.8, "sim_12": 0.7,
                             "cross_00": 0.5, "cross_11": 0.25, "cross_22": 0.125}, {"sim_01": 0.5}]))
    assert MARGIN_NAMES == ["m01_0", "m01_1", "m02_0", "m02_2", "m12_1", "m12_2"]
    np.testing.assert_allclose(m[0], [0.4, 0.65, 0.3, 0.675, 0.45, 0.575])
    assert np.isnan(m[1]).all()


def test_arrow_input_matches_pandas():
    df = sims_frame([{"sim_01": 0.9, "sim_02": 0.2, "cross_00": 0.5, "cross_11": 0.3},
                     {"sim_01": 0.4, "cross_00": 0.5, "cross_11": 0.3}])
    assert nearid_scores(pa.Table.from_pandas(df)) == nearid_scores(df)


def test_missing_columns_error_names_them():
    df = sims_frame([{"sim_01": 0.9}]).drop(columns=["cross_11", "sim_12"])
    with pytest.raises(ValueError, match=r"\['sim_12', 'cross_11'\]"):
        nearid_scores(df)


def test_infinite_value_is_rejected():
    with pytest.raises(ValueError, match="cross_00"):
        nearid_scores(sims_frame([{"sim_01": 0.9, "cross_00": float("inf")}]))


# ----------------------------------------------------------------------------- table / pooling
def pooling_frame() -> pd.DataFrame:
    win = {"sim_01": 0.9, "cross_00": 0.1, "cross_11": 0.1}   # 2 winning terms, SSR row
    lose = {"sim_01": 0.1, "cross_00": 0.9, "cross_11": 0.9}  # 2 losing terms
    return sims_frame([{**win, "setting": "a"},
                       {**lose, "setting": "b"}, {**lose, "setting": "b"}, {**lose, "setting": "b"},
                       {**win, "setting": "fluxc"}])


def test_micro_pooling_differs_from_macro():
    table = nearid_table(pooling_frame(), pooled=["a", "b"]).set_index("setting")
    assert table.loc["a", "ssr"] == 100.0 and table.loc["b", "ssr"] == 0.0
    # micro: 1 winning row of 4 = 25%; the macro mean of the two settings would be 50%
    assert table.loc["pooled", "ssr"] == 25.0
    assert (table.loc["a", "ssr"] + table.loc["b", "ssr"]) / 2 == 50.0
    assert table.loc["pooled", "n"] == 4
    # paper PA micro: wins 2 + mean-trials 1 over terms 8 + rows 4
    assert math.isclose(table.loc["pooled", "pa"], 100 * 3 / 12)
    assert list(table.columns) == ["ssr", "pa", "pa_pure", "n", "n_excluded"]


def test_held_apart_is_reported_but_not_pooled():
    table = nearid_table(pooling_frame(), held_apart=["fluxc"]).set_index("setting")
    assert table.loc["fluxc", "ssr"] == 100.0 and table.loc["fluxc", "n"] == 1
    assert table.loc["pooled", "n"] == 4 and table.loc["pooled", "ssr"] == 25.0
    everything = nearid_table(pooling_frame()).set_index("setting")
    assert everything.loc["pooled", "n"] == 5 and everything.loc["pooled", "ssr"] == 40.0


def test_pooled_setting_not_present_is_an_error():
    with pytest.raises(ValueError, match="qwen"):
        nearid_table(pooling_frame(), pooled=["a", "qwen"])
    with pytest.raises(ValueError, match="both"):
        nearid_table(pooling_frame(), pooled=["a", "fluxc"], held_apart=["fluxc"])
    with pytest.raises(ValueError, match="'setting'"):
        nearid_table(pooling_frame().drop(columns="setting"))
    with pytest.raises(ValueError, match="pooled_name"):
        nearid_table(pooling_frame(), pooled_name="a")


def test_paper_settings_constant():
    assert len(PAPER_POOLED_SETTINGS) == 7 and "fluxc" not in PAPER_POOLED_SETTINGS


# ----------------------------------------------------------------------------- Fisher z / MTG
def test_fisher_z_mean():
    assert math.isclose(fisher_z_mean([0.5, 0.5]), 0.5)
    # atanh(0.5) = 0.5493, atanh(0) = 0 (NaN -> 0) -> tanh(0.2747) = 0.2680
    assert math.isclose(fisher_z_mean([0.5, NAN]), math.tanh(math.atanh(0.5) / 2))
    assert math.isclose(fisher_z_mean([1.0], clip=0.999), 0.999)  # clipped before atanh
    with pytest.raises(ValueError):
        fisher_z_mean([])


def test_mtg_hand_case():
    df = pd.DataFrame({"s12": [0.9, 0.9, 0.25],
                       "s1_1p": [0.1, 0.2, 0.3], "oracle1": [0.1, 0.3, 0.2],
                       "s2_2p": [0.1, 0.2, 0.3], "oracle2": [0.2, 0.4, 0.6],
                       "s1_2p": [0.3, 0.1, 0.2], "s2_1p": [0.4, 0.4, 0.4]})
    out = mtg_scores(df)
    # m1 = .8 .7 -.05, m2 = .8 .7 -.05 -> SSR 2/3, PA 4/6
    assert math.isclose(out["ssr"], 200 / 3) and math.isclose(out["pa"], 400 / 6)
    # r(s1_1p,o1): dx=[-.1,0,.1] dy=[-.1,.1,0] -> .01/sqrt(.02*.02) = 0.5
    # r(s2_2p,o2) = 1 (o2 = 2*s2_2p), clipped to .999
    # r(s1_2p,o2): dx=[.1,-.1,0] dy=[-.2,0,.2] -> -.02/sqrt(.02*.08) = -0.5
    # r(s2_1p,o1): constant s2_1p -> undefined -> 0
    assert math.isclose(out["r_s1_1p_o1"], 0.5) and math.isclose(out["r_s1_2p_o2"], -0.5)
    assert out["r_s2_1p_o1"] == 0.0
    z = math.atanh(0.999)
    assert math.isclose(out["m_o"], math.tanh(z / 4), rel_tol=1e-9)  # .5 and -.5 cancel
    assert math.isclose(out["m_o_pair"], math.tanh((math.atanh(0.5) + z) / 2), rel_tol=1e-9)
    assert out["n"] == 3


def test_mtg_rejects_nan_and_missing():
    df = pd.DataFrame({c: [0.5, NAN] for c in ["s12", "s1_1p", "s1_2p", "s2_2p", "s2_1p", "oracle1", "oracle2"]})
    with pytest.raises(ValueError, match="NaN"):
        mtg_scores(df)
    with pytest.raises(ValueError, match="oracle2"):
        mtg_scores(df.drop(columns="oracle2"))


# ----------------------------------------------------------------------------- DreamBench++ M-H
def mh_frame() -> pd.DataFrame:
    rows = [  # (method, category, score, g1, g2)
        ("A", "object", 1, 1, 1), ("A", "object", 2, 2, 3), ("A", "object", 3, 3, 2),
        ("B", "object", 1, 3, 1), ("B", "object", 2, 1, 2), ("B", "object", 3, 2, 3),
        ("A", "animal", 1, 2, 5), ("A", "animal", 2, 1, 5),
        ("B", "animal", 1, 1, 1),
    ]
    return pd.DataFrame(rows, columns=["method", "category", "score", "rating_g1", "rating_g2"])


def test_mh_hand_case():
    out = mh_score(mh_frame())
    # object, A: score 1,2,3 vs g1 1,2,3 -> r=1; vs g2 1,3,2: dx=-1,0,1 dy=-1,1,0 -> 1/sqrt(2*2)=.5
    #   mean .75.  B: vs g1 3,1,2: dy=1,-1,0 -> -1/2 = -.5; vs g2 -> 1; mean .25
    assert math.isclose(out["per_method"]["A"], 0.75) and math.isclose(out["per_method"]["B"], 0.25)
    expected_object = math.tanh((math.atanh(0.75) + math.atanh(0.25)) / 2)
    assert out["scope"] == "object" and math.isclose(out["m_h"], expected_object)
    # animal, A: vs g1 2,1 -> r=-1 (clip -.9999); vs g2 constant -> 0; mean -.5.  B: one row -> 0
    assert math.isclose(out["per_category"]["animal"], math.tanh(math.atanh(-0.5) / 2))
    assert math.isclose(out["per_category"]["object"], expected_object)
    assert out["n"] == 9


def test_mh_without_object_category_pools_all_rows():
    df = mh_frame().replace({"category": {"object": "human"}})
    out = mh_score(df)
    assert out["scope"] == "all" and set(out["per_category"]) == {"human", "animal"}
    pooled = mh_score(df.drop(columns="category"), by_category=False)
    assert pooled["scope"] == "all" and pooled["per_category"] == {}
    assert math.isclose(out["m_h"], pooled["m_h"])


# ----------------------------------------------------------------------------- build_sims
def emb_frame() -> pd.DataFrame:
    rows = [  # (id, view, source, embedding); not normalised on purpose
        ("a", 0, "positive", [1, 0]), ("a", 1, "positive", [0, 1]), ("a", 2, "positive", [1, 1]),
        ("a", 0, "flux", [3, 0]), ("a", 1, "flux", [2, 2]),
        ("a", 2, "sdxl", [-1, -1]),
        ("b", 0, "positive", [2, 0]), ("b", 1, "positive", [5, 0]),
        ("b", 1, "flux", [0, 2]),
    ]
    df = pd.DataFrame(rows, columns=["id", "view", "source", "embedding"])
    df["embedding"] = [np.asarray(e, dtype=np.float32) for e in df["embedding"]]
    df["split"] = np.where(df["id"] == "a", "test", "train")
    return df


def test_build_sims_hand_case():
    out = build_sims(emb_frame()).set_index(["id", "setting"]).sort_index()
    h = 1 / math.sqrt(2)
    assert list(out.index) == [("a", "flux"), ("a", "sdxl"), ("b", "flux"), ("b", "sdxl")]
    a_flux = out.loc[("a", "flux")]
    np.testing.assert_allclose(a_flux[["sim_01", "sim_02", "sim_12", "cross_00", "cross_11"]].to_numpy(float),
                               [0, h, h, 1, h], atol=1e-12)
    assert np.isnan(a_flux["cross_22"]) and a_flux["split"] == "test"
    a_sdxl = out.loc[("a", "sdxl")]
    assert math.isclose(a_sdxl["cross_22"], -1) and np.isnan(a_sdxl["cross_00"])
    b_flux = out.loc[("b", "flux")]
    assert math.isclose(b_flux["sim_01"], 1) and b_flux["cross_11"] == 0 and np.isnan(b_flux["sim_02"])
    assert b_flux["split"] == "train"
    # (b, sdxl) has positives but no distractor: kept, and counted as excluded when scored
    assert nearid_scores(out)["n_excluded"] == 1


def test_build_sims_settings_and_arrow():
    only = build_sims(emb_frame(), settings=["sdxl"])
    assert set(only["setting"]) == {"sdxl"} and len(only) == 2
    table = pa.Table.from_pandas(emb_frame(), preserve_index=False)
    fixed = table.set_column(3, "embedding", pa.array(
        [e.tolist() for e in emb_frame()["embedding"]], type=pa.list_(pa.float32(), 2)))
    for t in (table, fixed):
        pd.testing.assert_frame_equal(build_sims(t), build_sims(emb_frame()))
    with pytest.raises(ValueError, match="qwen"):
        build_sims(emb_frame(), settings=["qwen"])


def test_build_sims_errors_name_the_row():
    df = emb_frame()
    df.at[4, "embedding"] = np.array([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"id='a', view=1, source='flux'.*3 values"):
        build_sims(df)
    df = emb_frame()
    df.at[7, "embedding"] = np.array([NAN, 1.0])
    with pytest.raises(ValueError, match=r"id='b', view=1, source='positive'.*NaN"):
        build_sims(df)
    df = pd.concat([emb_frame(), emb_frame().iloc[[5]]], ignore_index=True)
    with pytest.raises(ValueError, match=r"duplicate.*source='sdxl'"):
        build_sims(df)
    df = emb_frame()
    df.at[0, "view"] = 3
    with pytest.raises(ValueError, match="view"):
        build_sims(df)
    df = emb_frame()
    df.at[3, "split"] = "train"
    with pytest.raises(ValueError, match="'a'.*different splits"):
        build_sims(df)


def test_single_string_arguments_mean_one_name():
    table = nearid_table(pooling_frame(), pooled="a").set_index("setting")
    assert table.loc["pooled", "n"] == 1
    table = nearid_table(pooling_frame(), held_apart="fluxc").set_index("setting")
    assert table.loc["pooled", "n"] == 4
    assert set(build_sims(emb_frame(), settings="flux")["setting"]) == {"flux"}


# ----------------------------------------------------------------------------- two paths, one answer
def test_build_sims_and_validation_item_sims_agree():
    """The evaluate stage (`metrics.build_sims` on long-format embeddings) and training validation
    (`training.validate.item_sims` on item slots) must give the same sims rows, hence the same
    SSR/PA, for the same embeddings; missing views and distractors are NaN on both paths."""
    from nearid.training.items import N_VIEWS, item_sources
    from nearid.training.validate import item_sims

    rng = np.random.default_rng(7)
    ids, settings = [f"id{i}" for i in range(6)], ["flux", "sdxl"]
    sources = item_sources(settings)   # positive, flux, sdxl, mtg
    emb = rng.normal(size=(len(ids), len(sources) * N_VIEWS, 16))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    valid = np.ones((len(ids), len(sources) * N_VIEWS), np.int8)
    valid[:, sources.index("mtg") * N_VIEWS:] = 0          # no MTG slots in a NearID item
    valid[1, 2] = 0                                        # id1 lacks positive view 2
    valid[2, sources.index("flux") * N_VIEWS + 0] = 0      # id2 lacks flux's view-0 distractor
    valid[3, sources.index("sdxl") * N_VIEWS:sources.index("sdxl") * N_VIEWS + 3] = 0   # id3: no sdxl
    long = [{"id": i, "view": v, "source": s, "embedding": emb[r, k * N_VIEWS + v]}
            for r, i in enumerate(ids) for k, s in enumerate(sources) for v in range(N_VIEWS)
            if valid[r, k * N_VIEWS + v]]

    cols = ["sim_01", "sim_02", "sim_12", "cross_00", "cross_11", "cross_22"]
    a = build_sims(pd.DataFrame(long), settings=settings).set_index(["setting", "id"]).sort_index()
    b = item_sims(ids, emb, valid, sources, settings).set_index(["setting", "id"]).sort_index()
    assert list(a.index) == list(b.index)
    assert np.allclose(a[cols].to_numpy(), b[cols].to_numpy(), atol=1e-12, equal_nan=True)
    assert np.isnan(b.loc[("flux", "id1"), "sim_02"]) and np.isnan(b.loc[("flux", "id2"), "cross_00"])
    sa, sb = nearid_scores(a.reset_index()), nearid_scores(b.reset_index())
    for k in ("ssr", "pa", "pa_pure", "n", "n_terms"):
        assert math.isclose(sa[k], sb[k]), (k, sa, sb)
    ta = nearid_table(a.reset_index(), by="setting").set_index("setting")
    tb = nearid_table(b.reset_index(), by="setting").set_index("setting")
    assert np.allclose(ta[["ssr", "pa"]].to_numpy(), tb[["ssr", "pa"]].to_numpy())
