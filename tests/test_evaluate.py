"""Each benchmark path of the evaluation on hand-made embeddings (no Ray)."""
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from nearid.report import results_table, to_latex, to_markdown
from nearid.benchmarks.dreambench import dreambench
from nearid.benchmarks.mtg import mtg_bench
from nearid.benchmarks.nearid import nearid_bench


def unit(deg):
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def emb_frame(rows):
    return pd.DataFrame([{"id": i, "view": v, "source": s, "split": sp, "embedding": e}
                         for i, v, s, sp, e in rows])


def test_nearid_bench_pools_micro_and_holds_apart():
    # id a: views at 0/10/20 deg; distractors in view 0 at 30 deg (cos .866 < cos 10 deg .985 -> win)
    rows = [("a", v, "positive", "test", unit(10 * v)) for v in range(3)]
    rows += [("a", v, "flux", "test", unit(10 * v + 30)) for v in range(3)]   # all terms win
    rows += [("a", v, "fluxc", "test", unit(10 * v + 1)) for v in range(3)]   # every distractor wins
    rows += [("b", v, "positive", "train", unit(0)) for v in range(3)]          # other split: ignored
    sims, table = nearid_bench(emb_frame(rows), "test", None, ["fluxc"])
    t = table.set_index("setting")
    assert t.loc["flux", "ssr"] == 100 and t.loc["fluxc", "ssr"] == 0
    assert t.loc["pooled", "ssr"] == 100 and t.loc["pooled", "n"] == 1  # fluxc held apart
    with pytest.raises(ValueError, match="qwen"):
        nearid_bench(emb_frame(rows), "test", ["flux", "qwen"], [])


def test_mtg_bench_known_answer():
    # s12 = cos 20, s1_1p = cos 10 (> s12: loss), s2_2p = cos 40 (< s12: win)
    rows = [("m1", 0, "mtg", "test", unit(0)), ("m1", 1, "mtg", "test", unit(20)),
            ("m1", 2, "mtg", "test", unit(10)), ("m1", 3, "mtg", "test", unit(60)),
            ("m2", 0, "mtg", "test", unit(0)), ("m2", 1, "mtg", "test", unit(5)),
            ("m2", 2, "mtg", "test", unit(30)), ("m2", 3, "mtg", "test", unit(50))]
    meta = pa.table({"id": ["m1", "m2"], "split": ["test", "test"], "oracle1": [0.9, 0.5],
                     "oracle2": [0.8, 0.6]})
    out = mtg_bench(emb_frame(rows), meta, "test")
    # m1: m1 loses, m2 wins; m2: both win -> SSR 50, PA 3/4
    assert out["ssr"] == 50 and out["pa"] == 75 and out["n"] == 2


def test_dreambench_known_answer():
    rows, g = [], []
    for m, degs in (("good", [0, 30, 60]), ("bad", [60, 30, 0])):
        for k, d in enumerate(degs):
            rows += [(f"r{k}/{m}", 0, "graded", "test", unit(0)), (f"r{k}/{m}", 1, "graded", "test", unit(d))]
            g.append({"id": f"r{k}", "method": m, "category": "mug", "rating_g1": 3 - k, "rating_g2": 3 - k})
    out = dreambench(emb_frame(rows), pa.Table.from_pylist(g))
    # score falls with angle; ratings fall with k: r = +1 for "good", -1 for "bad" -> FisherZ mean 0
    # cos(0, 30, 60 deg) = 1, .866, .5 vs ratings 3, 2, 1: Pearson .966 (not exactly linear)
    assert out["per_method"]["good"] == pytest.approx(0.96593, abs=1e-4)
    assert out["per_method"]["bad"] == pytest.approx(-0.96593, abs=1e-4) and out["n"] == 6
    assert abs(out["m_h"]) < 1e-6


def test_report_formats():
    df = results_table([{"scorer": "frozen:map", "nearid_ssr": 1.0, "mtg_m_o": 0.1234, "rows": 10},
                        {"scorer": "nearid", "nearid_ssr": 50.0, "mtg_m_o": float("nan"), "rows": 10}])
    md = to_markdown(df)
    assert "| nearid | 50.00 | - | 10 |" in md and "0.123" in md
    assert to_latex(df).count("\\\\") == 3


def test_nearid_bench_reports_seen_and_unseen_settings():
    # flux (trained on) wins every term; sdxl (never trained on) loses every term
    rows = [("a", v, "positive", "test", unit(10 * v)) for v in range(3)]
    rows += [("a", v, "flux", "test", unit(10 * v + 30)) for v in range(3)]
    rows += [("a", v, "sdxl", "test", unit(10 * v + 1)) for v in range(3)]
    _, table = nearid_bench(emb_frame(rows), "test", None, [], seen=["flux"])
    assert list(table["setting"]) == ["flux", "sdxl", "seen", "unseen", "pooled"]
    t = table.set_index("setting")
    assert (t.loc["seen", "ssr"], t.loc["unseen", "ssr"], t.loc["pooled", "ssr"]) == (100, 0, 50)
    assert t.loc["unseen", "n"] == 1 and t.loc["pooled", "n"] == 2
    # every pooled setting trained on: no unseen group, no extra rows
    _, table = nearid_bench(emb_frame(rows), "test", None, [], seen=["flux", "sdxl"])
    assert list(table["setting"]) == ["flux", "sdxl", "pooled"]


def test_scorer_strings_parse_in_one_place_and_bad_ones_are_named(tmp_path):
    from nearid.checks import check_scorers
    from nearid.config import ConfigError
    from nearid.scorers import Scorer, parse_scorer

    assert parse_scorer("nearid") == Scorer("nearid", None, None)
    assert parse_scorer("nearid:runs/x/models/y") == Scorer("nearid", None, "runs/x/models/y")
    assert parse_scorer("frozen:map") == Scorer("frozen", "map", None)
    assert parse_scorer("frozen:cls@dinov2-small@112") == Scorer("frozen", "cls", "dinov2-small@112")
    assert parse_scorer("frozen:mean@openai/clip-vit-base-patch32").other_backbone
    # which scorers may start an extraction, so the evaluation starts Ray for them (a frozen
    # baseline on another backbone alone used to fail for want of one)
    assert [parse_scorer(s).may_extract for s in ("frozen:map", "frozen:cls@dinov2-small", "nearid", "nearid:m")] \
        == [False, True, True, True]
    for bad, msg in (("frozen:pooled", "unknown readout 'pooled'"), ("frozen:cls@", "no backbone after '@'"),
                     ("clip", "unknown scorer 'clip'"), ("nearid:", "unknown scorer")):
        with pytest.raises(ValueError, match=msg):
            parse_scorer(bad)
    check_scorers(["frozen:map", "frozen:cls@facebook/dinov2-small", "nearid"], ["map", "mean"])
    with pytest.raises(ConfigError, match=r"eval.scorers: scorer 'frozen:cls' needs readout 'cls'.*frozen:cls@"):
        check_scorers(["frozen:cls"], ["map", "mean"])
    with pytest.raises(ConfigError, match="eval.scorers: unknown scorer 'x'"):
        check_scorers(["x"], ["map"])
    with pytest.raises(ConfigError, match="model dir not found"):
        check_scorers([f"nearid:{tmp_path / 'none'}"], ["map"])
