"""The local dev stack on one machine: a Ray head, an MLflow server and an S3 server on 127.0.0.1.

`start_stack` writes `<state_dir>/stack.json` (pids, ports, URLs). `stop_stack` never runs
`ray stop` (that kills every Ray runtime on the machine): it stops the process trees it started,
plus any process that inherited this stack's id (`NEARID_STACK_ID`), and checks that they are
gone. The command line and the jobs submitted to the stack: `cluster/local.py`.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nearid.raytools import LOCAL_TRAIN_POLL_ENV

STACK_FILE = "stack.json"
STACK_ID_ENV = "NEARID_STACK_ID"


class StackError(RuntimeError):
    """The local stack cannot be started, reached or stopped; the message says which part and why."""

# ---- configuration -------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Port = Field(0, ge=0, le=65535)


class RayHeadConfig(_Strict):
    gcs_port: int = Port
    dashboard_port: int = Port
    client_server_port: int = Port
    dashboard_agent_listen_port: int = Port
    num_cpus: int = Field(4, ge=1)
    object_store_memory_mb: int = Field(512, ge=78)
    temp_dir: str = "/tmp/nearid-stack"


class MlflowServerConfig(_Strict):
    port: int = Port


class S3ServerConfig(_Strict):
    port: int = Port
    bucket: str = "nearid-demo"
    region: str = "us-east-1"
    access_key_id: str = "testing"
    secret_access_key: str = "testing"


class DemoConfig(_Strict):
    config: str = "configs/local.yaml"
    prefix: str = "demo"
    overrides: list[str] = []
    env_vars: dict[str, str] = {}


class StackConfig(_Strict):
    host: str = "127.0.0.1"
    state_dir: str = "runs/stack"
    ray: RayHeadConfig = RayHeadConfig()
    mlflow: MlflowServerConfig = MlflowServerConfig()
    s3: S3ServerConfig = S3ServerConfig()
    demo: DemoConfig = DemoConfig()

    @field_validator("host")
    @classmethod
    def _loopback_only(cls, v: str) -> str:
        # The local stack runs with test credentials: it must never listen beyond this machine.
        if v != "127.0.0.1":
            raise ValueError(f"the local stack binds 127.0.0.1 only, got {v!r}")
        return v


def load_stack_config(path: str | os.PathLike | None = None,
                      overrides: list[str] | None = None) -> StackConfig:
    """Load `cluster/local-stack.yaml` (or defaults) and apply `section.field=value` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise StackError(f"stack config not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise StackError(f"stack override '{item}' must look like section.field=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(raw)
    try:
        return StackConfig.model_validate(data)
    except ValidationError as e:
        msgs = [f"field '{'.'.join(map(str, err['loc']))}' = {err.get('input')!r}: {err['msg']}"
                for err in e.errors()]
        raise StackError(f"invalid stack config ({path or '<defaults>'}):\n  " + "\n  ".join(msgs)) from None


# ---- small helpers --------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _resolve_ports(cfg: StackConfig) -> dict[str, int]:
    wanted = {"gcs": cfg.ray.gcs_port, "dashboard": cfg.ray.dashboard_port,
              "client_server": cfg.ray.client_server_port,
              "dashboard_agent": cfg.ray.dashboard_agent_listen_port,
              "mlflow": cfg.mlflow.port, "s3": cfg.s3.port}
    ports: dict[str, int] = {}
    for name, port in wanted.items():
        if port == 0:
            port = free_port(cfg.host)
            while port in ports.values():
                port = free_port(cfg.host)
        elif not _port_is_free(cfg.host, port):
            raise StackError(f"port {port} ({name}) on {cfg.host} is already in use: stop whatever "
                             "holds it, or set that port to 0 in the stack config to pick a free one")
        ports[name] = port
    return ports


def venv_bin(name: str) -> str:
    """A console script of the running interpreter's environment (the venv), else PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _log_tail(path: str | Path, n: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    # A new session per service: its own process group, and no tie to the caller's terminal.
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_http(name: str, url: str, proc: subprocess.Popen, log: Path, timeout: float,
               headers: dict[str, str] | None = None) -> float:
    """Poll `url` until it answers 200; fail early if the process dies. Returns seconds waited."""
    t0 = time.time()
    last = "no answer yet"
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode} while starting; "
                             f"log {log}:\n{_log_tail(log)}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=3) as r:
                if r.status == 200:
                    return time.time() - t0
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(0.5)
    raise StackError(f"{name} did not answer at {url} within {timeout:.0f}s ({last}); "
                     f"log {log}:\n{_log_tail(log)}")


def _proc_record(proc: subprocess.Popen, cmd: list[str], log: Path) -> dict[str, Any]:
    import psutil

    return {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
            "cmd": shlex.join(cmd), "log": str(log)}


def read_state(state_dir: str | os.PathLike) -> dict[str, Any]:
    """The `stack.json` a running stack wrote; StackError if there is none."""
    path = Path(state_dir) / STACK_FILE
    if not path.is_file():
        raise StackError(f"no running stack: {path} does not exist (run `make cluster-up`)")
    return json.loads(path.read_text())


def _write_state(state: dict[str, Any]) -> None:
    path = Path(state["state_dir"]) / STACK_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def stack_commands(cfg: StackConfig, state_dir: Path, ports: dict[str, int],
                   token_path: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (command, extra env) of each server; every one binds `cfg.host` (127.0.0.1)."""
    host = cfg.host
    return {
        "s3": ([venv_bin("moto_server"), "-H", host, "-p", str(ports["s3"])], {}),
        "mlflow": ([venv_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{state_dir}/mlflow.db",
                    "--host", host, "--port", str(ports["mlflow"]), "--workers", "1",
                    "--serve-artifacts", "--artifacts-destination", str(state_dir / "mlartifacts")],
                   {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
        # --block keeps `ray start` as the parent of every Ray process, so `down` finds them all.
        "ray": ([venv_bin("ray"), "start", "--head", "--block", f"--node-ip-address={host}",
                 f"--dashboard-host={host}", f"--port={ports['gcs']}",
                 f"--dashboard-port={ports['dashboard']}",
                 f"--ray-client-server-port={ports['client_server']}",
                 f"--dashboard-agent-listen-port={ports['dashboard_agent']}",
                 f"--num-cpus={cfg.ray.num_cpus}",
                 f"--object-store-memory={cfg.ray.object_store_memory_mb * 1024 ** 2}",
                 f"--temp-dir={cfg.ray.temp_dir}", "--disable-usage-stats"],
                {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), **LOCAL_TRAIN_POLL_ENV}),
    }


# ---- start / stop ---------------------------------------------------------------------------------
def start_stack(cfg: StackConfig, cwd: str | os.PathLike = ".", timeout: float = 120.0) -> dict[str, Any]:
    """Start S3 (moto), MLflow and a Ray head on 127.0.0.1, wait until each answers, create the
    bucket; returns the state also written to `<state_dir>/stack.json`."""
    cwd = Path(cwd).resolve()
    state_dir = (cwd / cfg.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if (state_dir / STACK_FILE).exists():
        old = read_state(state_dir)
        if _alive_roots(old):
            raise StackError(f"a stack is already running from {state_dir / STACK_FILE} "
                             "(dashboard {}); run `make cluster-down` first".format(old["urls"]["dashboard"]))
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    token_path = state_dir / "ray_auth_token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    ports = _resolve_ports(cfg)
    host = cfg.host
    stack_id = uuid.uuid4().hex
    env = dict(os.environ)
    env.update({STACK_ID_ENV: stack_id, "RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "true",
                # `python` in a job's entrypoint must be this venv's interpreter
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    state: dict[str, Any] = {
        "id": stack_id, "state_dir": str(state_dir), "host": host, "ports": ports,
        "urls": {"dashboard": f"http://{host}:{ports['dashboard']}",
                 "ray_address": f"{host}:{ports['gcs']}",
                 "mlflow": f"http://{host}:{ports['mlflow']}",
                 "s3": f"http://{host}:{ports['s3']}"},
        "s3": {"bucket": cfg.s3.bucket, "region": cfg.s3.region},
        "ray_auth_token_path": str(token_path), "processes": {}, "ready": False,
    }
    cmds = stack_commands(cfg, state_dir, ports, token_path)
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, (cmd, extra) in cmds.items():
            log = logs / f"{name}.log"
            procs[name] = _spawn(cmd, {**env, **extra}, log, cwd)
            state["processes"][name] = _proc_record(procs[name], cmd, log)
        _write_state(state)   # written before waiting so `down` can clean up a half-started stack
        t0 = time.time()
        _wait_http("moto S3 server", state["urls"]["s3"] + "/", procs["s3"], logs / "s3.log", timeout)
        _wait_http("MLflow server", state["urls"]["mlflow"] + "/health", procs["mlflow"],
                   logs / "mlflow.log", timeout)
        _wait_http("Ray dashboard", state["urls"]["dashboard"] + "/api/version", procs["ray"],
                   logs / "ray.log", timeout, auth_headers(state))
        _wait_http("Ray job API", state["urls"]["dashboard"] + "/api/jobs/", procs["ray"],
                   logs / "ray.log", timeout, auth_headers(state))
        _create_bucket(state, cfg.s3)
        state["startup_s"] = round(time.time() - t0, 1)
        state["ready"] = True
        _write_state(state)
    except BaseException:
        if state["processes"]:
            _write_state(state)
            try:
                stop_stack(state_dir)
            except StackError as e:   # keep the start-up error; say what is left behind
                print(f"warning: cleaning up the half-started stack: {e}", file=sys.stderr)
        raise
    return state


def _create_bucket(state: dict[str, Any], s3: S3ServerConfig) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=state["urls"]["s3"], region_name=s3.region,
                          aws_access_key_id=s3.access_key_id, aws_secret_access_key=s3.secret_access_key)
    names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if s3.bucket not in names:
        client.create_bucket(Bucket=s3.bucket)


def _root_process(rec: dict[str, Any]):
    """The recorded process if it still runs (same pid *and* start time: pids get reused)."""
    import psutil

    try:
        p = psutil.Process(rec["pid"])
        if abs(p.create_time() - rec["create_time"]) < 1.0 and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except psutil.Error:
        pass
    return None


def _alive_roots(state: dict[str, Any]) -> list[int]:
    return [rec["pid"] for rec in state.get("processes", {}).values() if _root_process(rec)]


def stack_processes(state: dict[str, Any]) -> list:
    """Every live process of this stack: the started trees plus processes carrying its id."""
    import psutil

    protected = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for rec in state.get("processes", {}).values():
        root = _root_process(rec)
        if root is None:
            continue
        found[root.pid] = root
        try:
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            pass
    # Orphans (a worker whose raylet died first) are reparented away from the tree: they still
    # carry the stack id in their environment.
    for p in psutil.process_iter():
        if p.pid in found:
            continue
        try:
            if p.environ().get(STACK_ID_ENV) == state["id"]:
                found[p.pid] = p
        except psutil.Error:
            continue
    return [p for pid, p in sorted(found.items()) if pid not in protected]


def _is_gone(p) -> bool:
    import psutil

    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def stop_stack(state_dir: str | os.PathLike, grace_s: float = 8.0) -> list[int]:
    """Stop exactly this stack's processes (SIGTERM, then SIGKILL after `grace_s`); returns their
    pids. Raises StackError if any survives."""
    import psutil

    state = read_state(state_dir)
    procs = stack_processes(state)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and not all(_is_gone(p) for p in procs):
        time.sleep(0.2)
    for p in procs:
        if not _is_gone(p):
            try:
                p.kill()
            except psutil.Error:
                pass
    late = stack_processes(state)   # anything spawned while we were stopping
    for p in late:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs + late, timeout=10)   # returns as soon as every one is reaped
    survivors = [p.pid for p in procs + late if not _is_gone(p)]
    if survivors:
        raise StackError(f"stack processes still running after SIGKILL: {survivors}")
    path = Path(state["state_dir"]) / STACK_FILE
    path.replace(path.with_name("stack.stopped.json"))
    return sorted({p.pid for p in procs + late})


# ---- talking to the stack's token-auth Ray head --------------------------------------------------
def auth_headers(state: dict[str, Any]) -> dict[str, str]:
    """The HTTP header for Ray's token auth (job API, dashboard)."""
    token = Path(state["ray_auth_token_path"]).read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """Environment for `ray job ...` / JobSubmissionClient against this stack's token-auth head."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["ray_auth_token_path"]}
