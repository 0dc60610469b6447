"""Shared fixtures: one local Ray runtime per test session, a real S3-compatible server on loopback."""
from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a stall detector, not a speed limit: wide because CI may share a loaded box (pytest-timeout bounds tests)
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "600")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray renices every worker and actor process to 15 (RayConfig worker_niceness) so a node's own
# services win; on a CI box shared with other CPU work (nice 0) that leaves the suite's Ray work
# ~3 % of a core and a 2-minute stage takes an hour. The tests' workers run at the driver's
# priority instead (the setting travels to the runtimes the tests start: in-process, `ray start`
# heads and job subprocesses all inherit this environment). Clusters keep Ray's default.
os.environ.setdefault("RAY_worker_niceness", "0")


def noisy_pngs(root, n: int, heights=None) -> list[str]:
    """n PNGs 40 px wide (heights[i] tall, 40 by default): a random base colour plus noise, seeded
    by the index, so every image differs and scores are not constants."""
    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        h = heights[i] if heights else 40
        arr = np.clip(rng.integers(0, 256, 3) + rng.integers(-60, 60, (h, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(root / f"im{i}.png")
        out.append(str(root / f"im{i}.png"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """Start Ray once per session: 4 logical CPUs on 2 cores so actors never starve Data tasks."""
    import ray

    from nearid.raytools import start_local_ray

    if not ray.is_initialized():
        # address="local": a new runtime even if another process on this box runs a Ray head
        start_local_ray(ray, num_cpus=4, include_dashboard=False, object_store_memory=384 * 1024**2,
                 log_to_driver=False, ignore_reinit_error=True,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def attach_env(ray_local) -> dict[str, str]:
    """Env for a job subprocess that attaches to the session's Ray runtime (as a driver started by
    `ray job submit` attaches to its cluster) instead of starting its own: a local start in a child
    meets Ray's fixed start-up waits (15 s for the dashboard agent's ports, 30 s for the node to
    register with its GCS), which a loaded CI box missed three times in a row (GCS "Deadline
    Exceeded"); attaching takes none of them and saves each job the start-up."""
    return {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}


@pytest.fixture(scope="session")
def s3_server():
    """A real moto S3 server on 127.0.0.1 with a bucket; yields (endpoint_url, bucket)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="nearid-test")
    yield endpoint, "nearid-test"
    server.stop()


class JobProcess:
    """Runs `python -m <args>` in its own session with its output kept in a log file under tmp_path,
    so a failing assertion can show what the child printed (`.tail()`)."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.n = 0

    def run(self, args: list[str], env: dict | None = None, timeout: float = 600) -> tuple[int, str]:
        import signal
        import subprocess
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        self.n += 1
        log = self.dir / f"job-{self.n}-{args[0]}.log"
        full_env = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", *args], cwd=root, env=full_env,
                                    start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                try:  # whatever the driver started (its own local Ray, if any) goes with it
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.last_log = log
        return rc, log.read_text(errors="replace")

    def tail(self, n: int = 80) -> str:
        lines = self.last_log.read_text(errors="replace").splitlines()
        return f"--- last {min(n, len(lines))} lines of {self.last_log} ---\n" + "\n".join(lines[-n:])


@pytest.fixture
def job_process(tmp_path):
    return JobProcess(tmp_path)
