"""Fault hooks for the crash-and-resume tests, in one place.

`NEARID_FAULT=<stage>:<action>:<n>` arms one hook in a driver (it reaches Ray workers through the
runtime env, see `raytools.RUNTIME_ENV_KEYS`):
- `generate|extract:exit_after_chunks:<n>`: the stage driver exits (137) after n commits;
- `train:kill_driver_after_step:<n>`: a Ray Train worker SIGKILLs the job driver once, after the
  first checkpoint at or past step n has been registered by the controller;
- `tune:kill_driver_after_trials:<n>`: the sweep driver exits (137) once n trials are recorded as
  finished in the intact saved experiment state (what a restore will see);
- `lease:hold_until_file:1`: a stage keeps the leases it took until the file named by
  `NEARID_FAULT_FILE` exists (the test creates it once another run has met them).
The worker-kill hook of the Ray Train failure test is armed by the loop spec instead
(`training.spec.LoopSpec.fault_kill_step`, `fault_marker`; `run_train(extra_loop_config=...)`),
and so is the pause of the tracking-server test (`fault_pause_steps`, `fault_pause_dir`).

Each hook waits for a condition (a registered checkpoint, a recorded trial), never for a fixed
time, so a loaded machine makes them slower, not wrong.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("nearid.faults")
# A deadline, not a duration: how long a hook waits for the controller before giving up (and
# then not firing, so the test fails on its own assertion rather than on a half-made crash).
WAIT_S = 300.0


def armed(stage: str, action: str) -> int | None:
    """n of `NEARID_FAULT=<stage>:<action>:<n>`, or None when that hook is not armed."""
    parts = os.environ.get("NEARID_FAULT", "").split(":")
    if len(parts) == 3 and parts[0] == stage and parts[1] == action and parts[2].isdigit():
        return int(parts[2])
    return None


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def hold_leases(stage: str) -> None:
    if not armed("lease", "hold_until_file"):
        return
    release = Path(os.environ["NEARID_FAULT_FILE"])
    log.warning("NEARID_FAULT: holding the %s leases until %s exists", stage, release)
    wait_until(release.exists)


def exit_after_chunks(stage: str, done_chunks: int) -> None:
    """A crashed or preempted stage driver, right after its n-th commit."""
    if armed(stage, "exit_after_chunks") == done_chunks:
        log.warning("NEARID_FAULT: killing the %s driver after %d chunks", stage, done_chunks)
        os._exit(137)


def registered_checkpoint_step() -> int:
    """Step of the newest checkpoint the Ray Train controller has written to its snapshot
    (-1 when none yet, or while the snapshot is being rewritten)."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    try:
        with storage.storage_filesystem.open_input_stream(storage.checkpoint_manager_snapshot_path) as f:
            snap = json.loads(f.read())
    except (OSError, FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return -1
    results = list(snap.get("checkpoint_results") or []) + [snap.get("latest_checkpoint_result") or {}]
    steps = [int(r["metrics"]["step"]) for r in results if "step" in (r.get("metrics") or {})]
    return max(steps, default=-1)


def train_kill_driver(step: int, driver_pid: int | None, rank: int, storage) -> None:
    """`train:kill_driver_after_step:<n>`: once (a marker under the run root), SIGKILL the driver
    after the controller has registered the checkpoint of this step."""
    n = armed("train", "kill_driver_after_step")
    if n is None or rank != 0 or not driver_pid or step < n or storage.exists("_fault_driver_killed"):
        return
    storage.write_bytes("_fault_driver_killed", b"1")
    if not wait_until(lambda: registered_checkpoint_step() >= step):
        log.warning("NEARID_FAULT: checkpoint of step %d never registered; not killing the driver", step)
        return
    os.kill(int(driver_pid), signal.SIGKILL)
    # the controller goes down with the driver and takes this worker with it
    wait_until(lambda: False, timeout=WAIT_S, interval=1.0)


def train_kill_worker(spec, step: int, rank: int, world: int, last_reported_step: int) -> None:
    """`spec.fault_kill_step` (a `training.spec.LoopSpec`): kill the last worker once, at that
    step, after the controller has registered the last checkpoint reported before it (a marker
    file, `spec.fault_marker`, makes it once)."""
    kill_at, marker = spec.fault_kill_step, spec.fault_marker
    if not kill_at or step != kill_at or rank != world - 1 or not marker or os.path.exists(marker):
        return
    Path(marker).write_text("killed")
    if last_reported_step > 0:
        wait_until(lambda: registered_checkpoint_step() >= last_reported_step)
    os._exit(1)


def train_pause_at_step(spec, step: int, rank: int) -> None:
    """`spec.fault_pause_steps` [s, ...] + `spec.fault_pause_dir` D: rank 0 writes D/reached-<s> at
    step s and waits until the test writes D/go-<s> (it stops or restarts a server in between)."""
    steps, d = spec.fault_pause_steps or (), spec.fault_pause_dir
    if rank != 0 or not d or step not in steps:
        return
    Path(d, f"reached-{step}").write_text(str(os.getpid()))
    if not wait_until(lambda: Path(d, f"go-{step}").exists()):
        log.warning("NEARID_FAULT: no go-%d in %s; going on", step, d)


def tune_kill_after_trials(state: dict, marker: Path) -> None:
    """`tune:kill_driver_after_trials:<n>`: exit the sweep driver once the intact saved state
    (`tune.state.StateKeeper` calls this right after saving it) records n finished trials.
    Reads the variable at call time: the keeper is pickled with the experiment and restored."""
    n = armed("tune", "kill_driver_after_trials")
    if n is None or marker.exists():
        return
    done = [t["trial_id"] for t in (json.loads(j) for j, _ in state.get("trial_data", []))
            if t["status"] == "TERMINATED"]
    if len(done) >= n:
        marker.write_text(",".join(done))
        log.warning("NEARID_FAULT: killing the sweep driver after %d recorded trials", len(done))
        os._exit(137)
