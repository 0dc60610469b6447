"""Thin Ray glue shared by the stages: start/attach Ray, run a Ray Data pipeline into a table."""
from __future__ import annotations

import json
import logging
import os
import sys

from . import faults
from .numerics import ENV_KEYS as NUMERICS_ENV

log = logging.getLogger("nearid")

WORKER_ENV = {"HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_USAGE_STATS_ENABLED",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "NEARID_FAULT", "NEARID_ACTOR_LOG", *NUMERICS_ENV}


def record_placement(stage: str) -> None:
    """NEARID_ACTOR_LOG=<file>: a model actor appends where it runs (node, GPU ids), so a test on a
    simulated multi-node cluster can check one actor per declared GPU across nodes."""
    path = os.environ.get("NEARID_ACTOR_LOG")
    if not path:
        return
    import ray

    ctx = ray.get_runtime_context()
    with open(path, "a") as f:
        f.write(json.dumps({"stage": stage, "node": ctx.get_node_id(), "gpus": ray.get_gpu_ids()}) + "\n")


def _job_env_keys() -> set[str]:
    """Env vars the runtime env of a submitted job already sets: Ray refuses a driver's
    ray.init(runtime_env=...) that sets one of them again ("Failed to merge the Job's runtime env")."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return set(((json.loads(raw) or {}).get("runtime_env") or {}).get("env_vars") or {}) if raw else set()
    except (ValueError, AttributeError):
        return set()


def init_ray(cfg=None):
    """Attach to a cluster (`ray job submit` sets RAY_ADDRESS) or start a local runtime."""
    import ray

    if ray.is_initialized():
        return ray
    address = (cfg.ray.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    skip = _job_env_keys()   # inside `ray job submit`: the job's env already reaches every worker
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ and k not in skip}
    kwargs = dict(log_to_driver=True, ignore_reinit_error=True, runtime_env={"env_vars": env})
    if address:
        ray.init(address=address, **kwargs)
    else:
        n = cfg.ray.num_cpus if cfg is not None and cfg.ray.num_cpus else max(4, os.cpu_count() or 2)
        mem = (cfg.ray.object_store_memory_mb if cfg is not None and cfg.ray.object_store_memory_mb
               else 512) * 1024**2
        # address="local": always a new runtime, never one a `ray start` on this machine left behind
        start_local_ray(ray, num_cpus=n, include_dashboard=False, object_store_memory=mem, **kwargs)
    ctx = ray.data.DataContext.get_current()
    # bars are for a terminal: in a log file (CI, `ray job logs`) they are thousands of escape codes
    bars = sys.stdout.isatty() or os.environ.get("NEARID_PROGRESS_BARS") == "1"
    ctx.enable_progress_bars = bars
    ctx.enable_operator_progress_bars = bars
    return ray


LOCAL_START_TRIES = 3
# Ray Train's controller polls its workers every 2 s (sized for clusters); a run's start, each
# report and its end wait for a poll, ~4 s of a tiny local training. On one machine a poll is a
# local RPC, so local runtimes poll 8x as often (their workers inherit the raylet's environment).
LOCAL_TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def use_local_train_poll() -> None:
    for k, v in LOCAL_TRAIN_POLL_ENV.items():
        os.environ.setdefault(k, v)


def start_local_ray(ray, tries: int = LOCAL_START_TRIES, **init_kwargs) -> None:
    """`ray.init(address="local")`, retried when the node times out during start-up.

    Ray 2.60's raylet gives its dashboard agent a fixed 15 s to report its ports and aborts
    otherwise (`WaitForDashboardAgentPorts`; `RAY_agent_register_timeout_ms` does not reach it), and
    the driver then gives up after a fixed 30 s ("The current node timed out during startup"): on a
    machine busy with other work the agent's imports can miss that. Each failed attempt's processes
    (new children of this one) are stopped, the last one's too, so a start that fails for good
    leaves nothing running."""
    use_local_train_poll()
    for attempt in range(1, tries + 1):
        before = _child_pids()
        try:
            ray.init(address="local", **init_kwargs)
            return
        except Exception as e:
            if "timed out during startup" not in str(e):
                raise
            left = _stop_new_children(before)
            ray.shutdown()
            if attempt == tries:
                log.warning("Ray's local start timed out %d times; stopped its %d processes", tries, left)
                raise
            log.warning("Ray's local start timed out (attempt %d of %d, a busy machine?): stopped its "
                        "%d processes, retrying", attempt, tries, left)


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _stop_new_children(before: set[int]) -> int:
    """Kill the children of this process that were not there `before`; returns how many."""
    import psutil

    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=30)
    return len(left)


def write_dataset(ds, storage, table: str, partition_cols: list[str] | None = None) -> list[str]:
    """Write a Ray Dataset atomically into `table`: stage, then move finished files into place."""
    write_id, stage = storage.staging_dir(table)
    ds.set_name(table)   # Ray's progress and log lines then say which table is being written
    try:
        ds.write_parquet(stage, filesystem=storage.fs, partition_cols=partition_cols or None)
    except BaseException:
        storage.delete_dir(f"{table}/_staging/{write_id}")
        raise
    return storage.commit_staging(table, write_id)


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def fault_point(stage: str, done_chunks: int) -> None:
    """Test hook (see `nearid.faults`): exit this driver after n commits."""
    faults.exit_after_chunks(stage, done_chunks)
