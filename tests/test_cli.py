"""The `nearid` command line: every subcommand answers --help, mistakes are one `error:` line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nearid import cli

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["score", "evaluate", "report", "mh", "mh-score", "convert"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert f"nearid {cmd}" in capsys.readouterr().out


def test_evaluate_takes_the_job_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f in out for f in ("--config", "--set", "--scorers", "--name"))


def test_evaluate_on_an_empty_root_is_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "nearid.cli", "evaluate", "--config", str(ROOT / "configs/local.yaml"),
                        "--set", f"run.root={tmp_path / 'empty'}", "--set", "train.los.name=x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert sum("error:" in line for line in p.stderr.splitlines()) == 1 and "train.los" in p.stderr
    assert "Traceback" not in p.stderr


CFG = str(ROOT / "configs/local.yaml")
LATE_MISTAKES = {   # each used to pass config loading and fail minutes later inside Ray
    "loss": (["jobs.train", "--set", "train.loss.name=nearidd"], "train.loss.name"),
    "loss-param": (["jobs.train", "--set", "train.loss.params={temperature: 0.07, alpa: 1}"], "alpa"),
    "scorer": (["jobs.evaluate", "--scorers", "frozen:mapp"], "frozen:mapp"),
    "scorer-config": (["jobs.evaluate", "--set", "eval.scorers=[nearid, frozen:clss]"], "frozen:clss"),
    "backend": (["jobs.generate", "--set", "generate.settings={flux: {backend: flux_fil}}"], "flux_fil"),
    "tracking": (["jobs.train", "--set", "tracking.uri=htp://127.0.0.1:5000"], "htp://"),
    "space": (["jobs.tune", "--space", "tune/spaces/nope.yaml"], "nope.yaml"),
}


@pytest.mark.parametrize("case", sorted(LATE_MISTAKES))
def test_mistakes_are_refused_before_ray_starts(case, tmp_path):
    args, needle = LATE_MISTAKES[case]
    p = subprocess.run([sys.executable, "-m", args[0], "--config", CFG, "--set", f"run.root={tmp_path / 'r'}",
                        *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, (case, p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in p.stderr, (case, p.stderr[-3000:])
    assert "Traceback" not in p.stderr and "Started a local Ray instance" not in p.stderr, case


@pytest.mark.parametrize("config", ["configs/local.yaml", "configs/paper.yaml"])
def test_plan_prints_the_cost_before_a_run(config, capsys, monkeypatch, tmp_path):
    from nearid.config import load_config
    from nearid.plan import plan

    monkeypatch.setenv("NEARID_GPU_CHECK", str(tmp_path / "none.json"))
    monkeypatch.setenv("NEARID_SCALE", str(tmp_path / "none.json"))    # bench.scale's figures: tests/test_scale.py
    assert cli.main(["plan", "--config", str(ROOT / config), "--usd-per-gpu-hour", "2"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "token cache" in out and "$" in out
    p = plan(load_config(ROOT / config), 2.0)
    assert p["gpu_hours"] == pytest.approx(sum(line.gpu_hours for line in p["lines"]))
    assert p["usd"] == pytest.approx(2.0 * p["gpu_hours"])
    T, D = p["token_shape"]
    extract = next(line for line in p["lines"] if line.stage.startswith("extract"))
    assert p["token_cache_bytes"] == extract.images * T * D * 2
    if config.endswith("paper.yaml"):
        assert (T, D) == (729, 1152) and p["identities"] == 19386
        assert p["token_cache_bytes"] > 500e9           # the paper's scale: hundreds of GB of tokens
        assert len([line for line in p["lines"] if line.stage.startswith("generate")]) == 8
    # measured costs from bench/gpu_check.py replace the estimates
    measured = tmp_path / "gpu.json"
    measured.write_text('{"extract_img_s": 100.0}')
    monkeypatch.setenv("NEARID_GPU_CHECK", str(measured))
    q = plan(load_config(ROOT / config), 2.0)
    ex = next(line for line in q["lines"] if line.stage.startswith("extract"))
    assert ex.source.startswith("measured") and ex.gpu_hours == pytest.approx(ex.images / 100.0 / 3600)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from nearid.model import NearIDModel

    d = tmp_path_factory.mktemp("model") / "tiny"
    NearIDModel.from_backbone("tiny-random").save_pretrained(str(d))
    return d


def _run(args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_runtime_mistakes_name_the_file(tiny_model_dir, tmp_path, capsys):
    """`nearid score` mistakes go through the console script's own wrapper in this process
    (`run_entry`, what `entry()` runs: no Ray there); the jobs' mistakes run as processes, their
    exit status included (each child spends seconds importing torch and Ray)."""
    from nearid import cli
    from nearid.launch import run_entry

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,generated\na.png,b.png\n")
    in_process = {
        "not an image": (["score", str(notes), str(notes), "--model", str(tiny_model_dir)], "notes.txt: cannot decode"),
        "missing image": (["score", str(tmp_path / "gone.png"), str(notes), "--model", str(tiny_model_dir)],
                          "gone.png"),
        "missing model": (["score", str(notes), str(notes), "--model", str(tmp_path / "nomodel")], "nomodel"),
    }
    for name, (args, needle) in in_process.items():
        capsys.readouterr()
        rc = run_entry(cli.main, args)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert rc == 2, (name, err[-3000:])
        assert len(errors) == 1 and needle in errors[0], (name, err[-3000:])
        assert "LocalFileOpener" not in err, name
    with pytest.raises(Exception):                                # --debug lets the error through
        run_entry(cli.main, ["--debug", "score", str(notes), str(notes), "--model", str(tiny_model_dir)])
    cases = {
        "missing pairs": (["jobs.score", "--pairs", str(tmp_path / "nopairs.csv"), "--model", str(tiny_model_dir),
                           "--out", str(tmp_path / "o")], "nopairs.csv"),
        "missing model dir (job)": (["jobs.score", "--pairs", str(pairs), "--model", str(tmp_path / "m2"),
                                     "--out", str(tmp_path / "o")], "m2"),
        "empty run folder": (["jobs.evaluate", "--config", CFG, "--set", f"run.root={tmp_path / 'empty'}",
                              "--scorers", "frozen:cls"], "no features table"),
        "scorer model dir": (["jobs.evaluate", "--config", CFG, "--set", f"run.root={tmp_path / 'empty'}",
                              "--scorers", f"nearid:{tmp_path / 'm3'}"], "m3"),
    }
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(cases, pool.map(lambda c: _run(c[0]), cases.values())))
    for name, (args, needle) in cases.items():
        p = done[name]
        errors = [line for line in p.stderr.splitlines() if "error:" in line]
        assert p.returncode == 2, (name, p.stderr[-3000:])
        assert len(errors) == 1 and needle in errors[0], (name, p.stderr[-3000:])
        assert "Traceback" not in p.stderr and "LocalFileOpener" not in p.stderr, name
