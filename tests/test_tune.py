"""Ray Tune sweeps (tune/sweep.py): search spaces, tie-broken ASHA, MLflow parent/child runs,
resume after a killed driver, and the loss ablation table.

Fast tests check the pure parts with hand-computed answers. The slow ones share one tiny world
(36 identities, built once) on the session's local Ray and real MLflow (SQLite).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from nearid.config import load_config
from nearid.io.storage import Storage
from tune.state import GOOD_COPY, StateUnreadable, prepare_restore, read_state, state_files
from tune.sweep import (GridSearcher, DefineByRun, SpaceError, TieBreakASHA, ablation_frame, apply_trial,
                        effective_params, load_space, plan_reports, recorded_trials, tie_broken)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["synth.n_identities=36", "synth.n_mtg=6", "synth.n_graded=4", "generate.validate_sample=20",
         "synth.split={train: 0.6, val: 0.2, test: 0.2}", "train.epochs=2", "train.batch_size=16",
         "train.warmup_steps=2", "tune.max_concurrent_trials=2", "tune.epochs=2", "tune.cpus_per_trial=0.5",
         "tune.grace_period=1", "tune.reduction_factor=2"]
# configs/local.yaml runs DINOv2 at 112 px on photos; these tests pin the tiny world (fast)
TINY = ["extract.backbone.name=tiny-random", "synth.resolution=64", "extract.readouts=[map, mean]",
        "synth.backgrounds=procedural", "synth.min_visible_share=0", "train.token_dropout=0",
        "eval.scorers=[\"frozen:map\", \"frozen:mean\", nearid]"]
SMALL = [*TINY, *SMALL]


def cfg_for(root, *extra):
    return load_config(ROOT / "configs/local.yaml", [f"run.root={root}", *SMALL, *extra])


def argv_for(root, *extra):
    out = ["--config", str(ROOT / "configs/local.yaml"), "--set", f"run.root={root}"]
    for s in [*SMALL, *extra]:
        out += ["--set", s]
    return out


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- fast: the pure parts ------------------------------------------------------------------------
def _state(**statuses) -> str:
    return json.dumps({"trial_data": [[json.dumps({"trial_id": t, "status": st}), "{}"]
                                      for t, st in statuses.items()], "runner_data": {}, "stats": {}})


def test_torn_experiment_state_falls_back_to_the_last_intact_copy(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    assert read_state(str(exp)) is None and recorded_trials(str(exp)) == {}   # nothing saved yet
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(_state(a="TERMINATED"))
    good = _state(a="TERMINATED", b="RUNNING")
    newest = exp / "experiment_state-2026-01-02_00-00-00.json"
    newest.write_text(good)
    from tune.state import save_good_copy

    assert save_good_copy(str(exp))["trial_data"]                 # what the StateKeeper callback does
    newest.write_text(good[: len(good) // 2])                     # Tune was copying when we looked
    assert recorded_trials(str(exp)) == {"a": "TERMINATED", "b": "RUNNING"}
    newest.write_text("")                                         # an empty file reads the same
    assert recorded_trials(str(exp)) == {"a": "TERMINATED", "b": "RUNNING"}
    msg = prepare_restore(str(exp))
    assert msg and "torn" in msg
    assert json.loads(newest.read_text()) == json.loads(good)     # Tune restores from an intact file
    assert [p.name for p in exp.glob("*.torn-*")] and len(state_files(str(exp))) == 2
    assert prepare_restore(str(exp)) is None                      # nothing left to repair
    (exp / GOOD_COPY).unlink()
    newest.write_text("{")
    with pytest.raises(StateUnreadable, match=newest.name):
        read_state(str(exp), attempts=2, delay=0.01)


def test_finished_trials_keep_their_best_two_and_last_checkpoints_running_ones_keep_all(tmp_path):
    """Tune's own num_to_keep deleted a checkpoint the intact state saved a moment before still
    named, so a resume from that state failed the trial (seen in the suite). Only trials the saved
    state records TERMINATED are pruned: to their last checkpoint and their best 2 by the score."""
    from tune.state import prune_finished

    exp = tmp_path / "exp"
    ssr = {"a": [5, 40, 10, 30, 20, 0], "b": [1, 2, 3]}
    for trial, scores in ssr.items():
        for i, v in enumerate(scores):
            (exp / trial / f"checkpoint_{i:06d}").mkdir(parents=True)
        lines = [json.dumps({"val_ssr": v, "checkpoint_dir_name": f"checkpoint_{i:06d}"}) for i, v in enumerate(scores)]
        (exp / trial / "result.json").write_text("\n".join([*lines, '{"val_ssr": 9'] ) + "\n")  # a cut last line
    state = json.loads(_state(a="TERMINATED", b="RUNNING"))
    done: set = set()
    deleted = prune_finished(str(exp), state, 2, lambda r: r.get("val_ssr"), "max", done=done)
    left = {t: sorted(p.name for p in (exp / t).glob("checkpoint_*")) for t in ssr}
    assert left["a"] == ["checkpoint_000001", "checkpoint_000003", "checkpoint_000005"]   # 40, 30, the last
    assert deleted == {"a": ["checkpoint_000000", "checkpoint_000002", "checkpoint_000004"]}
    assert len(left["b"]) == 3 and done == {"a"}                  # running: every checkpoint stays
    (exp / "a" / "checkpoint_000009").mkdir()                       # done once: not looked at again
    assert prune_finished(str(exp), state, 2, lambda r: r.get("val_ssr"), "max", done=done) == {}
    low = prune_finished(str(exp), json.loads(_state(b="TERMINATED")), 1, lambda r: r.get("val_ssr"), "min")
    assert low == {"b": ["checkpoint_000001"]}                      # min mode: the lowest and the last stay


def test_torn_searcher_state_is_replaced_by_the_copy_saved_with_the_experiment_state(tmp_path):
    """A driver killed while Tune copied `searcher-state-*.pkl` left it empty (seen in CI): Tune's
    restore then fails and starts the sweep again. The copy saved with the intact experiment state
    takes its place; the torn file is kept aside. Checked without unpickling."""
    from ray import cloudpickle

    from tune.state import save_good_copy

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment_state-2026-01-02_00-00-00.json").write_text(_state(a="TERMINATED", b="RUNNING"))
    pkl = exp / "searcher-state-2026-01-02_00-00-00.pkl"
    gen = exp / "search_gen_state-2026-01-02_00-00-00.json"
    whole = cloudpickle.dumps({"counter": 4, "searcher": "random"})
    pkl.write_bytes(whole)
    gen.write_text(json.dumps({"_total_samples": 4}))
    assert save_good_copy(str(exp))["trial_data"]
    assert prepare_restore(str(exp)) is None                      # all whole: nothing to do
    for torn in (b"", whole[: len(whole) // 2]):
        pkl.write_bytes(torn)
        gen.write_text('{"_total_')
        msg = prepare_restore(str(exp))
        assert msg and msg.count("was torn") == 2 and pkl.name in msg, msg
        assert pkl.read_bytes() == whole and json.loads(gen.read_text()) == {"_total_samples": 4}
        assert prepare_restore(str(exp)) is None
    assert len(list(exp.glob("searcher-state-*.pkl.torn-*"))) >= 1
    assert list(exp.glob("searcher-state-*.pkl")) == [pkl]        # Tune's glob finds one, the whole one


def test_torn_experiment_state_is_reread_until_tune_finishes_writing(tmp_path, monkeypatch):
    import threading

    import tune.state as state_mod

    exp = tmp_path / "exp"
    exp.mkdir()
    f = exp / "experiment_state-2026-01-01_00-00-00.json"
    full = _state(a="TERMINATED")
    f.write_text(full[:10])
    first_read = threading.Event()
    real_parse = state_mod._parse

    def parse_then_finish(fs, path):      # the writer completes the file right after our first read
        out = real_parse(fs, path)
        if not first_read.is_set():
            first_read.set()
            f.write_text(full)
        return out

    monkeypatch.setattr(state_mod, "_parse", parse_then_finish)
    assert recorded_trials(str(exp)) == {"a": "TERMINATED"}
    assert first_read.is_set()


def test_plan_reports_mirrors_the_training_loop_schedule():
    cfg = load_config(None, ["train.batch_size=16", "train.epochs=2", "train.val_every_steps=50"])
    # 46 items / 16 = 2 steps per epoch, 2 reports per epoch wanted -> every step: 4 reports
    # (the sweep owns the cadence: val_every_steps=50 is overridden)
    assert plan_reports(46, cfg.train, 2) == (1, 4)
    # 80 items -> 5 steps/epoch, every 2 steps over 10 steps: 2, 4, 6, 8, 10
    assert plan_reports(80, cfg.train, 2) == (2, 5)
    cfg.train.epochs = 3  # 15 steps: 2, 4, ..., 14 and the last step 15
    assert plan_reports(80, cfg.train, 2) == (2, 8)
    cfg30 = load_config(None, ["train.batch_size=64", "train.epochs=30"])
    # 800 items -> 12 steps/epoch, one report per epoch over 360 steps
    assert plan_reports(800, cfg30.train, 1) == (12, 30)


def test_apply_trial_sets_loss_params_and_train_fields():
    base = load_config(None, ["train.loss.params={temperature: 0.05, alpha: 0.3}"])
    out = apply_trial(base, {"loss": "nearid", "nearid.alpha": 0.9, "train.lr": 0.002})
    assert out.train.loss.name == "nearid"
    assert out.train.loss.params == {"temperature": 0.05, "alpha": 0.9}
    assert out.train.lr == 0.002 and base.train.lr == 1e-4  # the base is untouched
    # the base params belong to the base loss: circle starts from its own defaults
    circle = apply_trial(base, {"loss": "circle", "circle.margin": 0.3, "train.seed": 7})
    assert circle.train.loss.params == {"margin": 0.3} and circle.train.seed == 7
    eff = effective_params(base, {"loss": "circle", "circle.margin": 0.3})
    assert eff["loss"] == "circle" and eff["loss.margin"] == 0.3 and eff["loss.gamma"] == 64.0
    assert "loss.alpha" not in eff
    with pytest.raises(ValueError, match="alpha"):
        apply_trial(base, {"loss": "triplet", "triplet.alpha": 0.5})


def test_load_space_rejects_bad_files_naming_the_key(tmp_path):
    good = load_space(ROOT / "tune/spaces/default.yaml")
    assert good.losses == ["nearid", "infonce", "circle_ranking"] and good.tie_break == "val_pa"
    cases = {
        "loss: {choice: [nearid, focal]}": "focal",
        "loss: {choice: [triplet]}\nparams: {triplet: {alpha: 0.5}}": "params.triplet.alpha",
        "loss: {choice: [nearid]}\ntrain: {lr: {loguniform: [0.0, 1.0]}}": "train.lr.loguniform",
        "loss: {choice: [nearid]}\ntrain: {epochs: 3}": "train.epochs",
        "loss: {choice: [nearid]}\nschedular: asha": "schedular",
        "loss: {grid: [nearid, infonce]}\nsearcher: optuna": "searcher: grid",
        "loss: {choice: [nearid]}\nparams: {nearid: {alpha: {uniform: [1, 0]}}}": "low < high",
    }
    for i, (text, needle) in enumerate(cases.items()):
        with pytest.raises(SpaceError, match=needle.replace("[", r"\[")):
            load_space(write_space(tmp_path / f"s{i}.yaml", text))


def test_define_by_run_samples_only_the_chosen_loss_parameters():
    import optuna

    space = load_space(ROOT / "tune/spaces/default.yaml")
    define = DefineByRun(space)
    # FixedTrial raises for any parameter it was not given: asking for another loss's
    # temperature (or circle's margin) would fail here
    trial = optuna.trial.FixedTrial({"loss": "infonce", "train.lr": 1e-3, "infonce.temperature": 0.05})
    assert define(trial) == {}
    assert trial.params == {"loss": "infonce", "train.lr": 1e-3, "infonce.temperature": 0.05}
    with pytest.raises(ValueError):
        define(optuna.trial.FixedTrial({"loss": "nearid", "train.lr": 1e-3, "nearid.temperature": 0.05}))


def test_ablation_grid_and_table():
    space = load_space(ROOT / "tune/spaces/loss_ablation.yaml")
    grid = space.grid()
    assert [p["loss"] for p in grid] == ["nearid", "infonce", "circle", "circle_ranking", "triplet",
                                         "siglip", "arcface"]
    assert all(p["train.seed"] == 0 and len(p) == 2 for p in grid)
    rows = [{"loss": "infonce", "test_ssr": 10.0, "test_pa": 40.0, "test_m_o": 0.2, "test_m_h": 0.5},
            {"loss": "nearid", "test_ssr": 20.0, "test_pa": 50.0, "test_m_o": 0.4, "test_m_h": 0.1},
            {"loss": "infonce", "test_ssr": 30.0, "test_pa": 60.0, "test_m_o": 0.0, "test_m_h": 0.3}]
    table = ablation_frame(rows, "test")
    assert list(table["loss"]) == ["infonce", "nearid"]
    first = table.iloc[0]
    assert (first["SSR"], first["PA"], first["M-O"], first["M-H"], first["seeds"]) == \
        pytest.approx((20.0, 50.0, 0.1, 0.4, 2))


def test_grid_searcher_hands_out_points_then_finishes_and_restores(tmp_path):
    g = GridSearcher([{"loss": "nearid"}, {"loss": "infonce"}], "val_ssr", "max")
    assert g.suggest("t1") == {"loss": "nearid"}
    g.save(str(tmp_path / "state.json"))
    assert g.suggest("t2") == {"loss": "infonce"}
    assert g.suggest("t3") == GridSearcher.FINISHED
    fresh = GridSearcher([], "val_ssr", "max")
    fresh.restore(str(tmp_path / "state.json"))
    assert fresh.suggest("t2") == {"loss": "infonce"}


def test_tie_break_lets_asha_rank_trials_that_tie_on_ssr():
    scored = tie_broken({"val_ssr": 0.0, "val_pa": 20.0}, "val_ssr", "val_pa")
    assert scored["val_ssr"] == pytest.approx(0.002)
    assert tie_broken({"loss": 3.0, "val_pa": 10.0}, "loss", "val_pa", "min")["loss"] == pytest.approx(2.999)
    assert tie_broken({"val_ssr": 5.0}, "val_ssr", None) == {"val_ssr": 5.0}

    def decisions(tie_break):
        sched = TieBreakASHA(tie_break=tie_break, time_attr="training_iteration", max_t=4,
                             grace_period=1, reduction_factor=2)
        sched.set_search_properties("val_ssr", "max")
        out = []
        for tid, pa in (("a", 10.0), ("b", 5.0)):
            trial = SimpleNamespace(trial_id=tid)
            sched.on_trial_add(None, trial)
            out.append(sched.on_trial_result(None, trial, {"training_iteration": 1, "val_ssr": 0.0,
                                                           "val_pa": pa}))
        return out

    assert decisions(None) == ["CONTINUE", "CONTINUE"]       # a tie at SSR 0: no information
    assert decisions("val_pa") == ["CONTINUE", "STOP"]       # b's PA is below the rung's median


# ---- slow: real sweeps on a tiny world ----------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    from jobs import pipeline
    from nearid.stages.train import build_items, train_settings

    root = tmp_path_factory.mktemp("tune_world")
    pipeline.main(argv_for(root) + ["--stages", "synth", "generate", "extract"])
    cfg, storage = cfg_for(root), Storage.open(str(root))
    settings = train_settings(cfg, storage)
    build_items(ray_local, cfg, storage, "train", settings, cfg.train.mtg_repeat)
    build_items(ray_local, cfg, storage, "val", settings, 0)
    return root


def mlflow_runs(root, name):
    from mlflow import MlflowClient

    from nearid.tracking import use_local_proxied_artifacts

    use_local_proxied_artifacts()   # artifacts are `mlflow-artifacts:` locations under the run root
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("nearid-local")
    parents = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")
    assert len(parents) == 1, f"expected one parent run named {name}"
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return client, parent, children


def result_lines(trial_dir: Path) -> int:
    return sum(1 for line in (trial_dir / "result.json").read_text().splitlines() if line.strip())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_asha_stops_trials_and_mlflow_has_parent_and_children(world, tmp_path, ray_local):
    from nearid.model import NearIDModel
    from tune.sweep import run_sweep

    # On this 36-identity world every trial's val SSR and PA are flat after 4 steps, so ASHA
    # would only see ties. Ranking by the training loss, with the three circle trials (loss
    # ~100) queued after the three infonce ones (~5-10), makes ASHA's first rung stop them.
    space = write_space(tmp_path / "asha.yaml", (
        "searcher: grid\nscheduler: asha\nreports_per_epoch: 2\n"
        "loss: {grid: [infonce, circle]}\ntrain: {lr: {grid: [1.0e-3, 2.0e-3, 3.0e-3]}}\n"))
    cfg = cfg_for(world, "tune.metric=loss", "tune.mode=min")
    storage = Storage.open(str(world))
    summary = run_sweep(cfg, storage, ray_local, str(space), name="asha")
    assert summary["trials"] == 6 and summary["errors"] == 0
    trials = pd.read_csv(world / "reports/asha/trials.csv")
    assert list(trials["loss"]) == ["infonce"] * 3 + ["circle"] * 3
    assert summary["stopped_early"] >= 2
    assert set(trials.loc[trials["outcome"] == "stopped_early", "loss"]) == {"circle"}
    max_t = plan_reports(storage.read_json("items_tokens_train/_SUCCESS.json")["rows"],
                         apply_trial(cfg, {}).train, 2)[1]
    stopped = trials[trials["outcome"] == "stopped_early"]
    assert len(stopped) == summary["stopped_early"] and (stopped["reports"] < max_t).all()
    for tid, reports in zip(trials["trial"], trials["reports"]):
        assert result_lines(world / "tune/asha" / tid) == reports
    model = NearIDModel.from_pretrained(summary["model_dir"])
    assert model.embedding_dim == 64
    assert summary["best_config"]["loss"] == "infonce"

    client, parent, children = mlflow_runs(world, "asha")
    assert parent.info.status == "FINISHED" and parent.data.tags["model_dir"] == summary["model_dir"]
    assert parent.data.params["best.loss"] == summary["best_config"]["loss"]
    assert parent.data.tags["count.stopped_early"] == str(summary["stopped_early"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.md", "trials.csv", "search_space.yaml", "plots"} <= arts
    plots = [a.path for a in client.list_artifacts(parent.info.run_id, "plots")]
    assert plots == ["plots/hparams_vs_loss.png"]
    assert len(children) == 6
    by_trial = {c.data.tags["tune.trial_id"]: c for c in children}
    assert set(by_trial) == set(trials["trial"])
    for row in trials.itertuples():
        child = by_trial[row.trial]
        assert child.info.status == "FINISHED" and child.data.tags["tune.outcome"] == row.outcome
        assert child.data.params["loss"] == row.loss and "train.lr" in child.data.params
        assert ("loss.gamma" in child.data.params) == (row.loss == "circle")
        history = client.get_metric_history(child.info.run_id, "val/ssr")
        assert len(history) == row.reports
        assert "final/val_pa" in child.data.metrics


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(world, tmp_path, ray_local, job_process,
                                                                       attach_env):
    from tune.sweep import run_sweep

    space = write_space(tmp_path / "resume.yaml", (
        "searcher: random\nscheduler: none\ncheckpoint: last\nreports_per_epoch: 2\n"
        "loss: {choice: [nearid, infonce]}\ntrain: {lr: {loguniform: [1.0e-4, 3.0e-3]}}\n"))
    # longer trials than the other tests: the kill must land while trials 3-4 still run
    extra = ["tune.num_samples=4", "tune.epochs=6", "train.epochs=6"]
    # save the experiment state every second so the hook sees finished trials before the rest end
    env = {**attach_env, "NEARID_FAULT": "tune:kill_driver_after_trials:2", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    args = [*argv_for(world, *extra), "--space", str(space), "--name", "resume"]
    rc, _ = job_process.run(["jobs.tune", *args], env, timeout=600)
    assert rc == 137, job_process.tail()
    exp = world / "tune/resume"
    # a driver killed while Tune copied its state leaves a torn file: the resume must survive it
    newest = state_files(str(exp))[-1]
    text = Path(newest).read_text()
    Path(newest).write_text(text[: len(text) // 2])
    # what the restore will see: the last intact copy, the state the kill hook acted on (the torn
    # newest file may be a moment newer and record a trial finished that the copy has running:
    # that one is resumed from its checkpoint, as it should be)
    before = recorded_trials(str(exp))
    finished = {t for t, s in before.items() if s == "TERMINATED"}
    assert len(finished) >= 2 and not (world / "reports/resume/summary.json").exists()
    snapshot = {t: (result_lines(exp / t), sorted(p.name for p in (exp / t).iterdir())) for t in finished}

    cfg = cfg_for(world, *extra)
    summary = run_sweep(cfg, Storage.open(str(world)), ray_local, str(space), name="resume")
    assert summary["trials"] == 4 and summary["errors"] == 0
    assert any(".torn-" in p.name for p in exp.iterdir())   # the torn file is kept aside
    after = recorded_trials(str(exp))
    assert set(after) >= set(before) and len(after) == 4
    assert all(s == "TERMINATED" for s in after.values())
    for t, (lines, files) in snapshot.items():  # finished trials: no new results, files or sessions
        now = sorted(p.name for p in (exp / t).iterdir())
        assert result_lines(exp / t) == lines
        # (a trial that finished just before the kill may be pruned only by the resumed driver)
        assert [f for f in now if not f.startswith("checkpoint_")] == [f for f in files if not f.startswith("checkpoint_")]
        assert set(now) <= set(files)
    for t in after:   # finished trials keep their last checkpoint and their best 2, nothing more
        kept = sorted(p.name for p in (exp / t).glob("checkpoint_*"))
        reported = [json.loads(x).get("checkpoint_dir_name") for x in (exp / t / "result.json").read_text().splitlines()]
        assert 1 <= len(kept) <= 3 and kept[-1] == max(filter(None, reported)), (t, kept)
    n_items = Storage.open(str(world)).read_json("items_tokens_train/_SUCCESS.json")["rows"]
    max_t = plan_reports(n_items, cfg.train, 2)[1]
    for t in after:  # every trial ran its full budget; unfinished ones were resumed
        last = json.loads((exp / t / "result.json").read_text().splitlines()[-1])
        assert last["training_iteration"] == max_t
        assert last["step"] == n_items // cfg.train.batch_size * cfg.train.epochs
    client, parent, children = mlflow_runs(world, "resume")
    assert parent.data.tags.get("tune.resumed") == "true" and parent.info.status == "FINISHED"
    assert sorted(c.data.tags["tune.trial_id"] for c in children) == sorted(after)
    assert all(c.info.status == "FINISHED" for c in children)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_loss_ablation_grid_writes_the_comparison_table(world, ray_local):
    from tune.sweep import evaluate_model_dir, run_sweep

    cfg = cfg_for(world, "tune.epochs=1")
    storage = Storage.open(str(world))
    summary = run_sweep(cfg, storage, ray_local, "tune/spaces/loss_ablation.yaml", name="ablation")
    losses = ["nearid", "infonce", "circle", "circle_ranking", "triplet", "siglip", "arcface"]
    assert summary["trials"] == 7 and summary["stopped_early"] == 0 and summary["errors"] == 0
    table = pd.read_csv(world / "reports/ablation/ablation.csv")
    assert list(table["loss"]) == losses
    assert list(table.columns) == ["loss", "SSR", "PA", "M-O", "M-H", "seeds"]
    assert table["SSR"].between(0, 100).all() and table["PA"].between(0, 100).all()
    assert table["M-H"].notna().all() and (table["seeds"] == 1).all()
    md = (world / "reports/ablation/ablation.md").read_text()
    assert md == summary["table_markdown"] and all(f"| {loss} |" in md for loss in losses)
    # the nearid row is the test-split evaluation of the nearid trial's last checkpoint
    trials = pd.read_csv(world / "reports/ablation/trials.csv")
    tid = trials.loc[trials["loss"] == "nearid", "trial"].item()
    last = sorted((world / "tune/ablation" / tid).glob("checkpoint_*"))[-1]
    direct = evaluate_model_dir(cfg, storage, str(last), "test")
    row = table.set_index("loss").loc["nearid"]
    assert (row["SSR"], row["PA"]) == pytest.approx((direct["ssr"], direct["pa"]))
    client, parent, children = mlflow_runs(world, "ablation")
    assert len(children) == 7 and {c.data.params["loss"] for c in children} == set(losses)
    assert {"ablation.md", "ablation.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert math.isclose(parent.data.metrics["ablation/nearid/SSR"], row["SSR"])
