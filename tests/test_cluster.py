"""Cluster operation: the manifests in cluster/, fail-fast endpoints, and a real local stack.

Fast tests validate every cluster file (YAML parses, the launcher config passes Ray's own schema,
entrypoints exist and parse --help, Ray versions equal the pyproject pin, token auth everywhere)
and that a dead S3 endpoint / Ray address / MLflow server stops a job at once with the endpoint in
the message. The slow test starts a Ray head (token auth), an MLflow server and moto's S3 server
on 127.0.0.1, submits a small pipeline through the Ray Jobs API, checks its outputs on S3 and its
runs in MLflow, then stops exactly the stack's processes.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from cluster.local import pipeline_args
from cluster.stack import StackError, free_port, load_stack_config, stack_commands
from nearid.preflight import EndpointError, check_ray_address, check_tracking_uri
from nearid.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
STAGES = ["synth", "generate", "extract", "train", "evaluate", "tune", "pipeline"]
PY = sys.executable


def ray_pin() -> str:
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def cluster_texts() -> dict[Path, str]:
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml", ".md", ".py", ".mk", ""}]
    return {p: p.read_text() for p in files if "__pycache__" not in p.parts}


def kuberay_docs() -> list[tuple[str, dict]]:
    out = []
    for p in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        out += [(p.name, d) for d in yaml.safe_load_all(p.read_text()) if d and d.get("apiVersion") == "ray.io/v1"]
    return out


def closed_port() -> int:
    return free_port()   # nothing listens there once the probe socket is closed


# ---- manifests ---------------------------------------------------------------------------------------
def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    names = {p.name for p in files}
    assert {"aws.yaml", "runtime_env.yaml", "local-stack.yaml", "raycluster-sweeps.yaml"} <= names
    assert {f"rayjob-{s}.yaml" for s in STAGES} <= names
    for p in files:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), p


def test_generated_rayjobs_are_up_to_date():
    out = subprocess.run([PY, str(CLUSTER / "make_rayjobs.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_aws_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    cfg = prepare_config(raw)
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "ray.head.cpu" and types["ray.head.cpu"]["node_config"]["InstanceType"].startswith("m")
    gen, train = types["ray.worker.gpu_gen"], types["ray.worker.gpu_train"]
    assert gen["node_config"]["InstanceType"].split(".")[0] in {"g6e", "p4de", "p5"}
    assert train["node_config"]["InstanceType"].split(".")[0] in {"g6", "g5"}
    assert gen["min_workers"] == train["min_workers"] == 0 and gen["max_workers"] > 0 and train["max_workers"] > 0
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray_pin()}-py311-gpu"
    assert any("pip install -e ." in c for c in cfg["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if "ray start" in c)
    bad = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    bad["available_node_types"]["ray.worker.gpu_gen"]["max_workers"] = "eight"
    with pytest.raises(Exception, match="not of type 'integer'"):
        validate_config(prepare_config(bad))


def test_runtime_env_file_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    assert {".venv", "runs", ".git"} <= set(env["excludes"])
    assert not any(k.startswith("AWS_SECRET") for k in env["env_vars"])


def test_ray_versions_in_cluster_files_equal_the_pyproject_pin():
    pin = ray_pin()
    patterns = [r"rayproject/ray:([0-9]+\.[0-9]+\.[0-9]+)", r"rayVersion:\s*'?([0-9.]+)'?",
                r"\bray(?:\[[^\]]*\])?==([0-9.]+)", r"__version__ == '([0-9.]+)'", r"nearid:ray([0-9.]+)-"]
    found = [(p.name, v) for p, text in cluster_texts().items() for pat in patterns for v in re.findall(pat, text)]
    # aws.yaml (image + check), Dockerfile (FROM + check + tag), 8 KubeRay files (rayVersion + images)
    assert len(found) >= 20, found
    assert {v for _, v in found} == {pin}, [f for f in found if f[1] != pin]


def test_every_entrypoint_module_exists_and_parses_help():
    mods = set()
    for text in cluster_texts().values():
        mods |= set(re.findall(r"python -m (jobs\.[a-z_]+)", text))
    assert {f"jobs.{s}" for s in STAGES} <= mods
    for m in mods:
        assert (ROOT / (m.replace(".", "/") + ".py")).is_file(), m
    # `python -m X --help` for every module, in one interpreter so torch/ray import once
    script = ("import contextlib, io, runpy, sys\n"
              "for m in sys.argv[1:]:\n"
              "    sys.argv = [m, '--help']; out = io.StringIO()\n"
              "    try:\n"
              "        with contextlib.redirect_stdout(out): runpy.run_module(m, run_name='__main__', alter_sys=True)\n"
              "        code = 'no-exit'\n"
              "    except SystemExit as e: code = e.code\n"
              "    print(m, code, '--config' in out.getvalue(), flush=True)\n")
    out = subprocess.run([PY, "-c", script, *sorted(mods)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert results == {m: "0 True" for m in mods}, out.stderr[-2000:]


def _token_auth_problems(doc: dict) -> list[str]:
    """Why a RayJob/RayCluster manifest would run without token auth (empty: it is on)."""
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    problems = []
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode is not token")
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob":
        pods.append(doc["spec"]["submitterPodTemplate"])
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                problems.append(f"{c['name']}: RAY_AUTH_MODE != token")
            if "secretKeyRef" not in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}):
                problems.append(f"{c['name']}: RAY_AUTH_TOKEN not from a Secret")
    return problems


def test_kuberay_manifests_token_auth_gpu_groups_and_runtime_env():
    docs = kuberay_docs()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds.count("RayJob") == len(STAGES) and kinds.count("RayCluster") == 1
    for name, doc in docs:
        assert _token_auth_problems(doc) == [], name
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert spec["rayVersion"] == ray_pin() and spec["enableInTreeAutoscaling"] is True
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
        if doc["kind"] == "RayJob":
            stage = doc["metadata"]["labels"]["nearid/stage"]
            assert doc["spec"]["shutdownAfterJobFinishes"] is True, name
            assert doc["spec"]["entrypoint"].startswith(f"python -m jobs.{stage} --config configs/paper.yaml")
            rt = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert rt["working_dir"] and rt["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
            assert f"--set tracking.uri={rt['env_vars']['MLFLOW_TRACKING_URI']}" in doc["spec"]["entrypoint"]
            assert "$" not in doc["spec"]["entrypoint"]   # the submitter pod's bash would expand it
            words = shlex.split(doc["spec"]["entrypoint"])
            job_cfg = load_config(ROOT / words[4], [words[i + 1] for i, w in enumerate(words) if w == "--set"])
            assert job_cfg.run.root.startswith("s3://") and job_cfg.tracking.uri == rt["env_vars"]["MLFLOW_TRACKING_URI"]
            env = {e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "nearid-s3"
            assert bool(gpu_groups) == (stage != "synth"), name   # synth renders on CPUs only
        else:
            assert gpu_groups
    # the checker itself catches a manifest without the token
    broken = kuberay_docs()[0][1]
    spec = broken["spec"].get("rayClusterSpec", broken["spec"])
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = []
    assert _token_auth_problems(broken) == ["ray-head: RAY_AUTH_MODE != token",
                                            "ray-head: RAY_AUTH_TOKEN not from a Secret"]


# ---- the local stack: configuration ---------------------------------------------------------------------
def test_local_stack_binds_loopback_with_token_auth(tmp_path):
    cfg = load_stack_config(CLUSTER / "local-stack.yaml")
    assert cfg.host == "127.0.0.1"
    ports = {"gcs": 1, "dashboard": 2, "client_server": 3, "dashboard_agent": 4, "mlflow": 5, "s3": 6}
    cmds = stack_commands(cfg, tmp_path, ports, tmp_path / "token")
    ray_cmd, ray_env = cmds["ray"]
    assert "--dashboard-host=127.0.0.1" in ray_cmd and "--node-ip-address=127.0.0.1" in ray_cmd
    assert "--head" in ray_cmd and "--port=1" in ray_cmd and "--dashboard-port=2" in ray_cmd
    assert ray_env["RAY_AUTH_MODE"] == "token"
    ml_cmd, ml_env = cmds["mlflow"]
    assert ml_cmd[ml_cmd.index("--host") + 1] == "127.0.0.1" and ml_cmd[ml_cmd.index("--workers") + 1] == "1"
    assert "--serve-artifacts" in ml_cmd and ml_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert cmds["s3"][0][-4:] == ["-H", "127.0.0.1", "-p", "6"]
    with pytest.raises(StackError, match="127.0.0.1 only"):
        load_stack_config(CLUSTER / "local-stack.yaml", ["host=0.0.0.0"])
    with pytest.raises(StackError, match="ray.gcs_port"):
        load_stack_config(CLUSTER / "local-stack.yaml", ["ray.gcs_port=70000"])


def test_local_mk_targets_use_the_venv():
    out = subprocess.run(["make", "-n", "-s", "cluster-down", "cluster-status"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert ".venv/bin/python -m cluster.local --config cluster/local-stack.yaml down" in out.stdout
    assert "ray stop" not in out.stdout


def test_demo_pipeline_arguments_make_a_valid_s3_config():
    cfg = load_stack_config(CLUSTER / "local-stack.yaml")
    state = {"s3": {"bucket": "bkt", "region": "us-east-1"},
             "urls": {"s3": "http://127.0.0.1:9000", "mlflow": "http://127.0.0.1:5001"}}
    argv = pipeline_args(cfg, state, prefix="p1", overrides=["train.epochs=1"])
    assert argv[:5] == ["python", "-m", "jobs.pipeline", "--config", "configs/local.yaml"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    job_cfg = load_config(ROOT / argv[4], sets)
    assert job_cfg.run.root == "s3://bkt/p1" and job_cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert job_cfg.tracking.uri == "http://127.0.0.1:5001" and job_cfg.ray.address == "auto"
    assert job_cfg.train.epochs == 1 and job_cfg.synth.n_identities == 48   # last override wins


# ---- fail fast on dead endpoints --------------------------------------------------------------------------
def test_endpoint_probes_accept_a_listener_and_reject_a_closed_port():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        check_ray_address(f"127.0.0.1:{srv.getsockname()[1]}", timeout=2)
    port = closed_port()
    with pytest.raises(EndpointError, match=f"127.0.0.1:{port}"):
        check_ray_address(f"ray://127.0.0.1:{port}", timeout=2)
    with pytest.raises(EndpointError, match="not host:port"):
        check_ray_address("nonsense", timeout=2)
    with pytest.raises(EndpointError, match=f"tracking.uri=http://127.0.0.1:{port}"):
        check_tracking_uri(f"http://127.0.0.1:{port}", timeout=2)
    check_ray_address("auto")                # nothing to probe: no error
    check_tracking_uri("sqlite:///x.db")


def test_jobs_fail_fast_naming_a_dead_endpoint(tmp_path):
    port = closed_port()
    local = ["--set", f"run.root={tmp_path / 'r'}"]
    cases = {
        "s3": (["jobs.synth", "--set", "run.root=s3://b/x", "--set", f"storage.endpoint_url=http://127.0.0.1:{port}"],
               f"endpoint http://127.0.0.1:{port}"),
        "ray": (["jobs.synth", *local, "--set", f"ray.address=127.0.0.1:{port}"], f"ray.address=127.0.0.1:{port}"),
        "mlflow": (["jobs.train", *local, "--set", f"tracking.uri=http://127.0.0.1:{port}"],
                   f"tracking.uri=http://127.0.0.1:{port}"),
    }
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    procs = {name: subprocess.Popen([PY, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (args, _) in cases.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=180)
        last = err.strip().splitlines()[-1]
        assert p.returncode == 2, (name, err[-2000:])
        assert last.startswith("error: ") and cases[name][1] in last, (name, last)
        assert "Traceback" not in err, name
    # no wall-clock assertion (a loaded CI box is slow): communicate(timeout=180) above already
    # fails the test if a job hangs on a dead endpoint instead of refusing it
    assert not (tmp_path / "r" / "positives").exists()   # nothing was written


# ---- the real local stack ----------------------------------------------------------------------------------
SMALL = ["synth.n_identities=24", "synth.n_mtg=4", "synth.n_graded=4", "train.epochs=1", "train.batch_size=16",
         "train.warmup_steps=2", "generate.validate_sample=10", "eval.plots=false",
         "generate.settings={flux: {backend: procedural, n_changes: 1, batch_size: 32}}"]
# the stack submits configs/local.yaml (DINOv2 at 112 px on photos); these tests pin the tiny world (fast)
TINY = ["extract.backbone.name=tiny-random", "synth.resolution=64", "extract.readouts=[map, mean]",
        "synth.backgrounds=procedural", "synth.min_visible_share=0", "train.token_dropout=0",
        "eval.scorers=[\"frozen:map\", \"frozen:mean\", nearid]"]
SMALL = [*TINY, *SMALL]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from cluster.stack import start_stack, stop_stack

    state_dir = tmp_path_factory.mktemp("stack")
    ports0 = [f"{k}=0" for k in ("ray.gcs_port", "ray.dashboard_port", "ray.client_server_port",
                                 "ray.dashboard_agent_listen_port", "mlflow.port", "s3.port")]
    cfg = load_stack_config(CLUSTER / "local-stack.yaml",
                            [f"state_dir={state_dir}", f"ray.temp_dir=/tmp/nearid-t{uuid.uuid4().hex[:6]}", *ports0])
    t0 = time.time()
    state = start_stack(cfg, cwd=ROOT, timeout=180)   # generous: CI boxes are often loaded
    print(f"stack up in {time.time() - t0:.1f}s: {state['urls']}")
    yield cfg, state
    if (Path(state["state_dir"]) / "stack.json").exists():
        stop_stack(state["state_dir"])
    shutil.rmtree(cfg.ray.temp_dir, ignore_errors=True)   # the head's session dir: logs, sockets


def _s3(state):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=state["urls"]["s3"], key="testing", secret="testing")


def _rows(fs, path: str, column: str | None = None) -> dict | int:
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    ds = pads.dataset(path, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)), format="parquet",
                      partitioning="hive", ignore_prefixes=["_", "."])
    if column is None:
        return ds.count_rows()
    values = ds.to_table(columns=[column])[column].to_pylist()
    return {v: values.count(v) for v in set(values)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_job_on_the_local_stack_writes_s3_and_tracks_in_mlflow(stack, monkeypatch):
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.local import job_runtime_env
    from cluster.stack import auth_headers, client_env

    cfg, state = stack
    for k, v in client_env(state).items():
        monkeypatch.setenv(k, v)
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError, match="401"):   # token auth is on: no token, no entry
        urllib.request.urlopen(state["urls"]["dashboard"] + "/api/jobs/", timeout=10)
    client = JobSubmissionClient(state["urls"]["dashboard"], headers=auth_headers(state))
    entrypoint = shlex.join(pipeline_args(cfg, state, prefix="ci", overrides=SMALL))
    t0 = time.time()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env(cfg, working_dir=ROOT))
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() - t0 < 720:
        time.sleep(3)
        status = client.get_job_status(job_id)
    print(f"job {job_id}: {status} after {time.time() - t0:.0f}s")
    if status != JobStatus.SUCCEEDED:
        print(client.get_job_logs(job_id)[-20000:])
        pytest.fail(f"job {job_id} ended {status}: {client.get_job_info(job_id).message}")
    logs = client.get_job_logs(job_id)
    assert "=== evaluate done" in logs and "| nearid |" in logs

    fs = _s3(state)
    root = f"{state['s3']['bucket']}/ci"
    listing = {p.rsplit("/", 1)[-1] for p in fs.ls(root)}
    assert {"positives", "distractors", "features", "models", "reports", "mtg", "graded",
            "pipeline_summary.json"} <= listing, listing
    assert _rows(fs, f"{root}/positives") == 24 * 3
    assert _rows(fs, f"{root}/distractors", "setting") == {"flux": 24 * 3}
    sources = _rows(fs, f"{root}/features", "source")
    assert sources["positive"] == sources["flux"] == 24 * 3 and {"mtg", "graded"} <= set(sources)
    assert fs.exists(f"{root}/models/demo-train/model.safetensors")
    keys = fs.find(root)
    assert not [k for k in keys if "/_staging/" in k or "/_probe/" in k or "/_tmp-" in k]   # nothing half-written

    mlc = MlflowClient(tracking_uri=state["urls"]["mlflow"])
    exp = mlc.get_experiment_by_name("nearid-local")
    runs = {r.info.run_name: r for r in mlc.search_runs([exp.experiment_id])}
    train, ev = runs["demo-train"], runs["demo-eval"]
    assert train.info.status == ev.info.status == "FINISHED"
    assert train.data.params["train.epochs"] == "1" and train.data.tags["data"] == f"s3://{root}"
    assert {"val/ssr", "val/pa"} <= set(train.data.metrics)
    scorers = {r.data.tags["scorer"]: r for r in mlc.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{ev.info.run_id}'")}
    assert 0.0 <= scorers["nearid"].data.metrics["eval/pa"] <= 100.0 and "eval/ssr" in scorers["frozen:map"].data.metrics
    assert mlc.get_model_version("nearid", train.data.tags["registered_version"]).run_id == train.info.run_id
    # artifacts went through the tracking server (--serve-artifacts) onto its disk
    assert "model" in {a.path for a in mlc.list_artifacts(train.info.run_id)}
    assert list((Path(state["state_dir"]) / "mlartifacts").rglob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stack_down_stops_exactly_its_processes(stack):
    import psutil

    from cluster.stack import stack_processes, stop_stack

    _, state = stack
    before = {p.pid for p in stack_processes(state)}
    roots = {rec["pid"] for rec in state["processes"].values()}
    assert roots <= before and len(before) > 5          # ray start + gcs + raylet + dashboard + ...
    bystander = subprocess.Popen(["sleep", "120"])     # a process of ours that is not in the stack
    try:
        stopped = set(stop_stack(state["state_dir"]))
        assert roots <= stopped
        for pid in stopped | before:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
        assert bystander.poll() is None and os.getpid() not in stopped
        for port in state["ports"].values():   # nothing listens on the stack's ports any more
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert not (Path(state["state_dir"]) / "stack.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_pool_shape_follows_the_cluster():
    from nearid.config import load_config
    from nearid.stages.extract import pool_shape

    e = load_config(None, ["extract.num_actors=0", "extract.gpus_per_actor=1", "extract.cpus_per_actor=4",
                           "extract.decode_cpus=1"]).extract
    # 8 GPUs, 64 CPUs: one model actor per GPU; decoders on the 31.5 CPUs left, at most 4 per model actor
    assert pool_shape(e, {"GPU": 8, "CPU": 64}) == {"model_actors": 8, "decode_actors": 31}
    assert pool_shape(e, {"GPU": 2, "CPU": 64}) == {"model_actors": 2, "decode_actors": 8}
    fixed = load_config(None, ["extract.num_actors=3", "extract.decode_actors=5"]).extract
    assert pool_shape(fixed, {"CPU": 2}) == {"model_actors": 3, "decode_actors": 5}
    # a model on the CPU: one decoder per model actor (decode is ~1/10 of its cost)
    cpu_only = load_config(None, []).extract
    assert pool_shape(cpu_only, {"CPU": 4}) == {"model_actors": 1, "decode_actors": 1}
    cpu_three = load_config(None, ["extract.num_actors=3", "extract.cpus_per_actor=4"]).extract
    assert pool_shape(cpu_three, {"CPU": 32}) == {"model_actors": 3, "decode_actors": 3}
    assert pool_shape(cpu_three, {"CPU": 12}) == {"model_actors": 3, "decode_actors": 1}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_model_actors_one_per_declared_gpu_across_simulated_nodes(tmp_path, job_process):
    log = tmp_path / "actors.jsonl"
    rc, out = job_process.run(["tests._multinode_run", str(tmp_path / "root"), str(log)], timeout=540)
    assert rc == 0, job_process.tail()
    info = json.loads(out.strip().splitlines()[-1])
    placed = [json.loads(line) for line in log.read_text().splitlines()]
    for stage in ("generate", "extract"):
        actors = [p for p in placed if p["stage"] == stage]
        # one model actor per declared GPU, on the two GPU nodes, each holding one GPU id
        assert len(actors) >= 2 and {a["node"] for a in actors} == set(info["nodes"]), (stage, placed)
        assert all(len(a["gpus"]) == 1 for a in actors), (stage, placed)
    assert info["generate"] == 36
