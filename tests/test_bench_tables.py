"""Known answers for the arithmetic behind the README's performance rows (no timing here)."""
from bench.bench_extract import summary_table


def test_marginal_rate_cancels_the_fixed_cost():
    # bare: 2 s fixed + 10 img/s; job: 30 s fixed + 9 img/s -> marginal ratio 0.90, fixed 2 / 30
    secs = {("bare", "small"): [2 + 240 / 10], ("bare", "big"): [2 + 960 / 10, 500.0, 2 + 960 / 10],
            (1, "small"): [30 + 240 / 9], (1, "big"): [30 + 960 / 9]}
    row = summary_table(secs, 240, 960, [1]).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "1"
    assert cells[1] == f"{960 / 98:.1f}" and cells[2] == f"{960 / (30 + 960 / 9):.1f}"   # medians, end to end
    assert cells[4] == "10.0 / 9.0" and cells[5] == "0.90" and cells[6] == "2 / 30"


def test_the_neighbour_control_compares_the_job_with_the_slowed_bare_loop():
    # bare alone 10 img/s; bare next to a busy decoder 8 img/s; job 7.6 img/s -> 0.76 and 0.95
    secs = {("bare", "small"): [240 / 10], ("bare", "big"): [960 / 10],
            ("neighbour", "small"): [1 + 240 / 8], ("neighbour", "big"): [1 + 960 / 8],
            (1, "small"): [20 + 240 / 7.6], (1, "big"): [20 + 960 / 7.6]}
    head, sep, row = summary_table(secs, 240, 960, [1]).splitlines()
    assert head.count("|") == sep.count("|") == row.count("|") == 10
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "0.76" and cells[7] == "8.0" and cells[8] == "0.95"
    # without the control the table keeps its seven columns
    del secs[("neighbour", "small")], secs[("neighbour", "big")]
    assert summary_table(secs, 240, 960, [1]).splitlines()[2].count("|") == 8


def test_bench_score_runs_the_three_ways_and_they_agree(tmp_path):
    import json

    from bench.bench_score import main
    from nearid.model import NearIDModel

    model = NearIDModel.from_backbone("tiny-random").save_pretrained(tmp_path / "m")
    out = main(["--model", str(model), "--pairs", "12", "--per-call", "1", "--size", "48", "--json", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["pairs"] == 12
    assert [r["pairs"] for r in out["rows"]] == [12, 12, 1]
    assert out["max_abs_diff_vs_cli"] < 1e-5            # NearIDScore == nearid score --pairs
    assert out["rows"][2]["x_vs_per_pair_process"] == 1.0 and all(r["pairs_per_s"] > 0 for r in out["rows"])
