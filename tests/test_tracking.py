"""MLflow tracking on a real SQLite store (no mocks): proxied artifacts that survive moving the
run folder, the `mlflow ui` recipe Tracker.ui_hint prints, the trained model as a registered
pyfunc, nested runs, grouped metric names, counts as tags/params."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from nearid.config import load_config
from nearid.model import NearIDModel
from nearid.io.storage import Storage
from nearid.tracking import Tracker, use_local_proxied_artifacts

from tests.conftest import free_port

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = [{"which": "final", "step": 6, "val": {"val_ssr": 40.0, "val_pa": 70.0, "val_rows": 12}},
             {"which": "final", "step": 8, "val": {"val_ssr": 45.0, "val_pa": 72.5, "val_rows": 12}}]


def tracker_for(root: Path) -> Tracker:
    cfg = load_config(ROOT / "configs/local.yaml", [f"run.root={root}"])
    return Tracker.from_config(cfg, Storage.open(str(root)))


def client_for(root: Path):
    from mlflow import MlflowClient

    use_local_proxied_artifacts()
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


def tiny_model_dir(path: Path, seed: int) -> Path:
    model = NearIDModel.from_backbone("tiny-random")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.save_pretrained(path)


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """Two training runs logged the way run_train logs them (nearid.stages.train._log_published),
    a report text, then the whole run folder moved. Returns (new root, run ids, logged info)."""
    from nearid.stages.train import _log_published

    base = tmp_path_factory.mktemp("tracking")
    root = base / "demo"
    storage = Storage.open(str(root))
    tracker = tracker_for(root)
    runs, logged = [], []
    for i, published in enumerate(PUBLISHED):
        name = f"t{i}-train"
        tiny_model_dir(root / "models" / name, seed=i)
        run_id = tracker.start(name, tags={"stage": "train"})
        tracker.log_metrics({"loss": 1.0 - i / 10, "val_ssr": published["val"]["val_ssr"]}, step=1)
        logged.append(_log_published(tracker, storage, name, run_id, storage.uri("models", name),
                                     published, "final"))
        tracker.log_text("| a | b |\n", "report/table.md")
        tracker.end()
        runs.append(run_id)
    assert tracker.lost == 0
    new_root = base / "elsewhere"
    shutil.move(str(root), str(new_root))
    assert not root.exists()
    return new_root, runs, logged


def test_artifacts_survive_moving_the_run_folder(moved):
    root, runs, _ = moved
    client = client_for(root)
    exp = client.get_experiment_by_name("nearid-local")
    assert exp.artifact_location == "mlflow-artifacts:/nearid-local"   # no absolute path recorded
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(runs[0])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/nearid-local/")
    assert {a.path for a in client.list_artifacts(runs[0])} >= {"model", "report"}
    assert {a.path for a in client.list_artifacts(runs[0], "model")} == {
        "model/config.json", "model/model.safetensors", "model/README.md", "model/protocol.json"}
    got = Path(client.download_artifacts(runs[0], "report/table.md", str(root.parent)))
    assert got.read_text() == "| a | b |\n"
    dl = Path(client.download_artifacts(runs[1], "model", str(root.parent / "dl")))
    assert (dl / "model.safetensors").read_bytes() == (root / "models/t1-train/model.safetensors").read_bytes()


def test_model_registered_with_a_version_per_run_and_pyfunc_scores_like_nearid_model(moved, tmp_path):
    import mlflow

    root, runs, logged = moved
    client = client_for(root)
    versions = sorted(client.search_model_versions("name = 'nearid'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"] and [v.run_id for v in versions] == runs
    assert [lg["version_uri"] for lg in logged] == ["models:/nearid/1", "models:/nearid/2"]
    assert versions[1].tags["published_step"] == "8" and float(versions[1].tags["val/ssr"]) == 45.0
    assert versions[1].tags["published"] == "final" and versions[1].tags["val/rows"] == "12"
    run = client.get_run(runs[1])
    assert run.data.tags["model_uri"] == "models:/nearid/2" and run.data.tags["published_step"] == "8"
    assert run.data.metrics["published/ssr"] == 45.0 and "published/rows" not in run.data.metrics
    assert run.data.tags["published/rows"] == "12"                       # a count: a tag, not a metric
    assert {"train/loss", "val/ssr"} <= set(run.data.metrics)
    lm = client.get_logged_model(logged[1]["model_id"])
    assert lm.status == "READY" and lm.source_run_id == runs[1]
    local = Path(mlflow.artifacts.download_artifacts(f"{lm.artifact_location}",
                                                     tracking_uri=f"sqlite:///{root}/mlflow.db",
                                                     dst_path=str(tmp_path / "lm")))
    files = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "artifacts/model_dir/model.safetensors", "artifacts/model_dir/config.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))]   # nothing pickled

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(a)
    Image.new("RGB", (40, 32), (30, 60, 200)).save(b)
    frame = pd.DataFrame({"reference": [str(a), str(a)], "generated": [str(b), str(a)]})
    prev = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    try:
        for version, seed in (("1", 0), ("2", 1)):
            scorer = mlflow.pyfunc.load_model(f"models:/nearid/{version}")
            assert [c.name for c in scorer.metadata.signature.inputs.inputs] == ["reference", "generated"]
            got = scorer.predict(frame)["score"].to_numpy()
            model = NearIDModel.from_pretrained(root / "models" / f"t{seed}-train")
            ia, ib = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
            want = model.score([ia, ia], [ib, ia]).numpy()
            assert got == pytest.approx(want, abs=1e-5)
            assert got[1] == pytest.approx(1.0, abs=1e-5)
        assert not (got == pytest.approx(
            mlflow.pyfunc.load_model("models:/nearid/1").predict(frame)["score"].to_numpy(), abs=1e-6))
    finally:
        mlflow.set_tracking_uri(None)
        if prev is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev


def test_near_id_score_and_cli_load_a_registered_version(moved, tmp_path, monkeypatch, capsys):
    """`NearIDScore("models:/nearid/<v>")` and `nearid score --model models:/nearid/<v>` score with
    that version's weights (run t<v-1>), through the SQLite store the demo writes."""
    from nearid import NearIDScore, cli

    root, _, _ = moved
    uri = f"sqlite:///{root}/mlflow.db"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(a)
    Image.new("RGB", (40, 32), (30, 160, 60)).save(b)
    got = {}
    for version in ("1", "2"):
        metric = NearIDScore(f"models:/nearid/{version}", tracking_uri=uri)
        metric.update([str(a), str(b)], [str(b), str(b)])
        got[version] = metric.compute()["scores"]
        model = NearIDModel.from_pretrained(root / "models" / f"t{int(version) - 1}-train")
        ia, ib = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
        assert got[version] == pytest.approx(model.score([ia, ib], [ib, ib]).tolist(), abs=1e-6)
    assert got["1"][0] != pytest.approx(got["2"][0], abs=1e-6)      # two versions, two models
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(["score", str(a), str(b), "--model", "models:/nearid/2"]) == 0
    assert capsys.readouterr().out.strip() == f"{got['2'][0]:.4f}"
    with pytest.raises(FileNotFoundError, match="models:/nearid/9: cannot fetch"):
        NearIDScore("models:/nearid/9", tracking_uri=uri)


def _serve(hint: str, port: int) -> subprocess.Popen:
    cmd = shlex.split(hint.split("  then open ")[0])
    assert cmd[:2] == ["mlflow", "ui"]
    cmd = [str(ROOT / ".venv/bin/mlflow"), *cmd[1:]]
    cmd[cmd.index("--port") + 1] = str(port)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen([*cmd, "--workers", "1"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=20).read())


def test_ui_recipe_from_ui_hint_serves_artifacts_and_models_after_the_move(moved):
    import mlflow

    root, runs, logged = moved
    tracker = tracker_for(root)        # the hint with the folder's new paths
    hint = tracker.ui_hint()
    exp_id = tracker.experiment_id()
    assert f"--backend-store-uri sqlite:///{root}/mlflow.db --artifacts-destination {root}/mlartifacts" in hint
    assert hint.endswith(f"#/experiments/{exp_id}/runs?workflowType=machine_learning")
    port = free_port()
    proc = _serve(hint, port)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() - t0 < 120, "mlflow ui did not start"
                time.sleep(0.5)
        # what the run page's artifact browser asks for
        files = _get(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={runs[0]}&path=model")["files"]
        assert {f["path"] for f in files} == {"model/config.json", "model/model.safetensors", "model/README.md",
                                              "model/protocol.json"}
        lm = _get(f"{base}/ajax-api/2.0/mlflow/logged-models/{logged[0]['model_id']}/artifacts/directories"
                  "?artifact_directory_path=artifacts/model_dir")["files"]
        assert "artifacts/model_dir/model.safetensors" in {f["path"] for f in lm}
        http = Tracker(base, "nearid-local")
        assert http.ui_hint() == f"open {base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        # the registered model loads through the server too (MLflow's own proxied artifacts)
        mlflow.set_tracking_uri(base)
        try:
            scorer = mlflow.pyfunc.load_model("models:/nearid/2")
        finally:
            mlflow.set_tracking_uri(None)
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        img = root / "models" / "probe.png"
        Image.new("RGB", (24, 24), (10, 120, 10)).save(img)
        out = scorer.predict(pd.DataFrame({"reference": [str(img)], "generated": [str(img)]}))
        assert out["score"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_child_runs_nest_and_metric_names_are_grouped(tmp_path):
    tracker = tracker_for(tmp_path)
    with tracker.run("parent", tags={"stage": "pipeline"}):
        with tracker.child_run("kid", tags={"stage": "x"}) as kid:
            kid.log_metrics({"loss": 0.5, "loss_ranking": 0.1, "lr": 1e-3, "val_ssr": 12.0,
                             "val_ssr_flux": 10.0, "val_rows": 40, "eval/ssr": 3.0, "mtg_n": 6}, step=5)
        late = tracker.child()
        late.start("kid2")
        tracker.for_run(late.run_id).log_params({"a": 1})
        late.end()
    client = client_for(tmp_path)
    parent = client.get_run(tracker.run_id)
    kids = {r.info.run_name: r for r in client.search_runs(
        [tracker.experiment_id()], f"tags.mlflow.parentRunId = '{tracker.run_id}'")}
    assert set(kids) == {"kid", "kid2"} and parent.info.status == "FINISHED"
    k = kids["kid"]
    assert set(k.data.metrics) == {"train/loss", "train/loss_ranking", "train/lr", "val/ssr", "val/ssr_flux",
                                   "eval/ssr"}
    assert k.data.tags["val/rows"] == "40" and k.data.tags["mtg_n"] == "6"
    assert k.info.status == "FINISHED" and kids["kid2"].data.params == {"a": "1"}


def test_each_scorer_gets_a_child_run_with_the_same_metric_names(tmp_path):
    from nearid.stages.evaluate_report import _log_scorer_runs

    rows = [{"scorer": "frozen:map", "nearid_ssr": 10.0, "nearid_pa": 50.0, "nearid_pa_pure": 40.0,
             "rows": 30, "mtg_m_o": 20.0, "mtg_m_o_pair": 25.0, "mtg_ssr": 5.0, "mtg_pa": 45.0,
             "mtg_n": 6, "db_m_h": 0.3, "db_n": 8},
            {"scorer": "nearid", "nearid_ssr": 30.0, "nearid_pa": 70.0, "nearid_pa_pure": 60.0,
             "rows": 30, "mtg_m_o": 40.0, "mtg_m_o_pair": 45.0, "mtg_ssr": 15.0, "mtg_pa": 65.0,
             "mtg_n": 6, "db_m_h": 0.5, "db_n": 8}]
    params = {"*": {"eval.split": "test"}, "nearid": {"model_dir": "/m", "model_uri": "models:/nearid/3",
                                                      "model_version": "nearid/3"}}
    tracker = tracker_for(tmp_path)
    with tracker.run("demo-eval"):
        _log_scorer_runs(tracker, {"rows": rows, "details": {}}, "demo-eval", params)
    client = client_for(tmp_path)
    kids = {r.data.tags["scorer"]: r for r in client.search_runs(
        [tracker.experiment_id()], f"tags.mlflow.parentRunId = '{tracker.run_id}'")}
    names = {"eval/ssr", "eval/pa", "eval/pa_pure", "mtg/m_o", "mtg/m_o_pair", "mtg/ssr", "mtg/pa", "dbpp/m_h"}
    assert set(kids) == {"frozen:map", "nearid"}
    assert set(kids["nearid"].data.metrics) == set(kids["frozen:map"].data.metrics) == names
    assert kids["nearid"].data.metrics["eval/ssr"] == 30.0
    p = kids["nearid"].data.params
    assert p["eval.split"] == "test" and p["scorer"] == "nearid" and p["model_uri"] == "models:/nearid/3"
    assert p["count.eval_rows"] == "30" and p["count.mtg_items"] == "6" and p["count.dbpp_pairs"] == "8"
    assert kids["nearid"].data.tags["model_uri"] == "models:/nearid/3"
    assert "model_uri" not in kids["frozen:map"].data.params
