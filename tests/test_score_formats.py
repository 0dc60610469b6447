"""`nearid score --pairs FILE --format csv|json|parquet --out OUT`, and one score scale everywhere:
the cosine of the two L2-normalised embeddings, in [-1, 1], also in `jobs.score`'s `scores` table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nearid import cli
from nearid.images import decode_image
from nearid.model import NearIDModel

from tests.conftest import noisy_pngs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("model") / "tiny"
    NearIDModel.from_backbone("tiny-random").save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return noisy_pngs(tmp_path_factory.mktemp("images"), 4)


@pytest.fixture(scope="module")
def pairs(images, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """pairs.csv (a `method` column too) and its frame."""
    frame = pd.DataFrame({"reference": [images[0], images[0], images[1], images[2]],
                          "generated": [images[0], images[1], images[3], images[3]],
                          "method": ["a", "a", "b", "b"]})
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    frame.to_csv(path, index=False)
    return path, frame


def expected_cosines(model_dir: str, frame: pd.DataFrame) -> np.ndarray:
    """Dot products of the embeddings, computed here pair by pair (not through score_pairs)."""
    model = NearIDModel.from_pretrained(model_dir)
    ref = [decode_image(Path(p).read_bytes()) for p in frame["reference"]]
    gen = [decode_image(Path(p).read_bytes()) for p in frame["generated"]]
    a, b = model.embed(ref), model.embed(gen)
    assert torch.allclose(a.norm(dim=-1), torch.ones(len(a)), atol=1e-5)      # unit norm
    return (a * b).sum(-1).numpy().astype(np.float64)


@pytest.fixture(scope="module")
def expected(model_dir, pairs) -> np.ndarray:
    cos = expected_cosines(model_dir, pairs[1])
    assert cos[0] == pytest.approx(1.0, abs=1e-6)        # the same image on both sides
    assert np.all(np.abs(cos) <= 1 + 1e-6) and np.ptp(cos) > 1e-3
    return cos


@pytest.mark.parametrize("ext,fmt", [(".csv", None), (".json", None), (".parquet", None),
                                     (".pq", None), (".txt", "json"), (".out", "csv"), (".bin", "parquet")])
def test_each_format_from_the_extension_or_the_flag(ext, fmt, model_dir, pairs, expected, tmp_path, capsys):
    path, frame = pairs
    out = tmp_path / f"scores{ext}"
    args = ["score", "--pairs", str(path), "--model", model_dir, "--out", str(out)]
    assert cli.main(args + (["--format", fmt] if fmt else [])) == 0
    kind = fmt or {".csv": "csv", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}[ext]
    assert f"wrote 4 scores (cosine, -1..1) to {out} ({kind})" in capsys.readouterr().out
    if kind == "json":
        got = json.loads(out.read_text())
        assert isinstance(got, list) and len(got) == 4
        assert [list(r) for r in got] == [["reference", "generated", "method", "score"]] * 4
        assert [r["reference"] for r in got] == list(frame["reference"])
        assert [r["method"] for r in got] == list(frame["method"])
        scores = np.array([r["score"] for r in got])
    else:
        back = pd.read_csv(out) if kind == "csv" else pd.read_parquet(out)
        assert list(back.columns) == ["reference", "generated", "method", "score"]
        assert list(back["generated"]) == list(frame["generated"])
        scores = back["score"].to_numpy()
    assert scores == pytest.approx(expected, abs=1e-6)
    assert scores[0] == pytest.approx(1.0, abs=1e-6)


def test_json_pairs_in_and_stdout_formats(model_dir, pairs, expected, tmp_path, capsys):
    path, frame = pairs
    src = tmp_path / "pairs.json"
    src.write_text(json.dumps(frame[["reference", "generated"]].to_dict(orient="records")))
    assert cli.main(["score", "--pairs", str(src), "--model", model_dir, "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["score"] for r in got] == pytest.approx(expected, abs=1e-6)
    assert cli.main(["score", "--pairs", str(src), "--model", model_dir, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "reference,generated,score" and len(lines) == 5
    assert [float(ln.rsplit(",", 1)[1]) for ln in lines[1:]] == pytest.approx(expected, abs=1e-6)


def test_one_pair_prints_the_same_cosine(model_dir, pairs, expected, capsys):
    frame = pairs[1]
    assert cli.main(["score", frame["reference"][1], frame["generated"][1], "--model", model_dir]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(expected[1], abs=6e-5)


def _mistake(kind: str, pairs_path: Path, tmp: Path) -> tuple[list[str], str]:
    if kind == "unknown_out_extension":
        return ["--pairs", str(pairs_path), "--out", str(tmp / "scores.xlsx")], "scores.xlsx"
    if kind == "parquet_to_terminal":
        return ["--pairs", str(pairs_path), "--format", "parquet"], "--format parquet needs --out"
    if kind == "missing_out_folder":
        return ["--pairs", str(pairs_path), "--out", str(tmp / "nope" / "s.csv")], "nope"
    if kind == "missing_pairs":
        return ["--pairs", str(tmp / "gone.csv"), "--out", str(tmp / "s.csv")], "gone.csv"
    if kind == "unknown_pairs_extension":
        bad = tmp / "pairs.tsv"
        bad.write_text("reference\tgenerated\n")
        return ["--pairs", str(bad)], "pairs.tsv"
    if kind == "missing_column":
        bad = tmp / "pairs.csv"
        bad.write_text("reference,gen\na.png,b.png\n")
        return ["--pairs", str(bad)], "['generated']"
    if kind == "json_not_a_list":
        bad = tmp / "pairs.json"
        bad.write_text('{"reference": "a.png", "generated": "b.png"}')
        return ["--pairs", str(bad)], "pairs.json"
    if kind == "format_without_pairs":
        return ["a.png", "b.png", "--format", "json"], "--pairs"
    raise AssertionError(kind)


MISTAKES = ["unknown_out_extension", "parquet_to_terminal", "missing_out_folder", "missing_pairs",
            "unknown_pairs_extension", "missing_column", "json_not_a_list", "format_without_pairs"]


@pytest.mark.parametrize("kind", MISTAKES)
def test_mistakes_are_one_error_line_before_scoring(kind, model_dir, pairs, tmp_path, capsys):
    args, needle = _mistake(kind, pairs[0], tmp_path)
    assert cli.main(["score", *args, "--model", model_dir]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    assert not list(tmp_path.glob("s.csv"))


# 900 s: a bound for a hung Ray job on a busy 2-core machine, not a speed limit (as test_dreambench)
@pytest.mark.timeout(900)
def test_batch_job_scores_table_holds_the_same_cosines(model_dir, pairs, expected, tmp_path, ray_local):
    from jobs import score
    from nearid.io.storage import Storage

    res = score.main(["--pairs", str(pairs[0]), "--model", model_dir, "--out", str(tmp_path / "run"),
                      "--batch-size", "2"])
    assert (res["pairs"], res["scored"], res["rejected"]) == (4, 4, 0)
    table = Storage.open(str(tmp_path / "run")).read_table("scores").to_pandas().sort_values("pair")
    assert table["score"].to_numpy() == pytest.approx(expected, abs=1e-5)     # cosine, not 100 * cos
    agg = res["per_method"].set_index("method")
    assert agg.loc["a", "mean"] == pytest.approx(expected[:2].mean(), abs=1e-5)
    assert agg.loc["b", "mean"] == pytest.approx(expected[2:].mean(), abs=1e-5)


def test_a_scores_file_can_be_scored_again(model_dir, pairs, expected, tmp_path, capsys):
    first, again = tmp_path / "first.csv", tmp_path / "again.json"
    assert cli.main(["score", "--pairs", str(pairs[0]), "--model", model_dir, "--out", str(first)]) == 0
    assert cli.main(["score", "--pairs", str(first), "--model", model_dir, "--out", str(again)]) == 0
    got = json.loads(again.read_text())
    assert [list(r) for r in got] == [["reference", "generated", "method", "score"]] * 4   # one score column
    assert [r["score"] for r in got] == pytest.approx(expected, abs=1e-6)


def test_one_pairs_reader_for_the_cli_the_batch_job_and_mh_score(images, tmp_path):
    """`score_io.read_pairs` is what `nearid score --pairs`, `jobs.score` and `nearid mh-score
    --pairs` read with: the same rows from CSV, JSON and Parquet; image bytes kept as bytes;
    each caller's error class and required columns."""
    from nearid.benchmarks.dreambench_mh import read_mh_pairs
    from nearid.benchmarks.dreambench_ratings import RatingsError
    from nearid.score_io import ScoreIOError, read_pairs
    from nearid.stages.score import read_pairs as read_batch_pairs

    frame = pd.DataFrame({"method": ["m", "m"], "key": ["k0", "k1"],
                          "reference": images[:2], "generated": images[2:4]})
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_parquet(tmp_path / "p.parquet")
    (tmp_path / "p.json").write_text(json.dumps(frame.to_dict("records")))
    read = {ext: read_pairs(str(tmp_path / f"p.{ext}")) for ext in ("csv", "json", "parquet")}
    for df in read.values():
        pd.testing.assert_frame_equal(df, read["csv"])
    assert read["csv"]["key"].tolist() == ["k0", "k1"]
    for ext in ("csv", "json", "parquet"):
        assert read_mh_pairs(str(tmp_path / f"p.{ext}"))["key"].tolist() == ["k0", "k1"]

    # the batch job: bytes in Parquet stay bytes; method/prompt/pair filled in
    with_bytes = frame.drop(columns=["method"]).assign(reference=[Path(p).read_bytes() for p in images[:2]])
    with_bytes.to_parquet(tmp_path / "b.parquet")
    table = read_batch_pairs(str(tmp_path / "b.parquet"))
    assert table.column("reference").to_pylist()[0] == Path(images[0]).read_bytes()
    assert table.column("method").to_pylist() == ["all", "all"] and table.column("pair").to_pylist() == [0, 1]

    frame.drop(columns=["key"]).to_csv(tmp_path / "nokey.csv", index=False)
    read_pairs(str(tmp_path / "nokey.csv"))  # the score CLI needs no key
    with pytest.raises(RatingsError, match=r"nokey\.csv: missing columns \['key'\]"):
        read_mh_pairs(str(tmp_path / "nokey.csv"))
    frame.assign(generated=["", images[3]]).to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(ScoreIOError, match=r"blank\.csv: row 0 has no generated"):
        read_pairs(str(tmp_path / "blank.csv"))
    with pytest.raises(ValueError, match=r"gone\.parquet: pairs file not found"):
        read_batch_pairs(str(tmp_path / "gone.parquet"))
