"""Reading a Tune experiment's saved state without tripping over Tune while it writes.

Tune rewrites `experiment_state-<session>.json` in its driver staging folder and then copies it
to the storage path in a background thread; the copy is not atomic, so a reader (our progress
hook, the post-fit check, a resume after a killed driver) can meet an empty or half-written file.
Ray's own readers (`ExperimentAnalysis`, `Tuner.restore`) parse that same file once and crash on
a torn copy, so we read it here with retries and keep a last intact copy beside it:

- `read_state` retries a torn newest file (it is usually mid-copy) and then falls back to the
  last intact copy `StateKeeper` saved; it raises `StateUnreadable` only when neither parses.
- `StateKeeper` (a Tune callback, on in every sweep) saves each intact state it sees as
  `_nearid_last_good_state.json` (written to a temp name and moved into place).
- Tune's own checkpoint pruning (`num_to_keep`) deletes checkpoints that an intact state saved a
  moment earlier still names, so a restore from that state fails its running trials ("checkpoint
  does not exist on storage anymore"). Tune keeps every checkpoint instead, and `prune_finished`
  deletes a trial's surplus ones only once the intact copy itself records the trial TERMINATED: no
  state a restore can read still needs them.
- `prepare_restore` runs before `Tuner.restore`: a torn newest file is moved aside (kept, never
  deleted) and replaced by the last intact copy, so Tune restores instead of crashing; the same
  for the search algorithm's state files (`SEARCH_FILES`), whose copies StateKeeper saves with it.
"""
from __future__ import annotations

import json
import logging
import time
import uuid

from pathlib import Path

import pyarrow.fs as pafs
from ray.tune import Callback

from nearid.faults import tune_kill_after_trials

log = logging.getLogger("nearid.tune")
GOOD_COPY = "_nearid_last_good_state.json"


class StateUnreadable(RuntimeError):
    """Experiment state files exist but none of them (nor the saved intact copy) parses."""


def _fs(fs):
    return fs or pafs.LocalFileSystem()


def _join(path: str, name: str) -> str:
    return f"{str(path).rstrip('/')}/{name}"


def state_files(experiment_path: str, fs=None) -> list[str]:
    """Experiment state files, newest session last (Ray picks the newest by name: a restore
    re-uploads older files, so mtime lies)."""
    infos = _fs(fs).get_file_info(pafs.FileSelector(str(experiment_path), allow_not_found=True))
    return sorted(i.path for i in infos
                  if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json"))


def _parse(fs, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            state = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError, OSError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("trial_data"), list) else None


def read_state(experiment_path: str, fs=None, attempts: int = 5, delay: float = 0.2) -> dict | None:
    """The newest intact experiment state, or None when Tune has saved none yet.

    A torn newest file is re-read `attempts` times (Tune's copy takes milliseconds) before the
    saved intact copy is used."""
    fs = _fs(fs)
    names = state_files(experiment_path, fs)
    if not names:
        return None
    for i in range(attempts):
        state = _parse(fs, names[-1])
        if state is not None:
            return state
        if i + 1 < attempts:
            time.sleep(delay * (i + 1))
    good = _parse(fs, _join(experiment_path, GOOD_COPY))
    if good is not None:
        log.warning("experiment state %s is torn; using the last intact copy %s", names[-1], GOOD_COPY)
        return good
    raise StateUnreadable(f"experiment state {names[-1]} does not parse after {attempts} reads and "
                          f"there is no intact copy ({GOOD_COPY}) beside it")


def trial_statuses(state: dict | None) -> dict[str, str]:
    """trial id -> Tune status (PENDING, RUNNING, TERMINATED, ERROR, ...) in a saved state."""
    out = {}
    for trial_json, _meta in (state or {}).get("trial_data", []):
        t = json.loads(trial_json)
        out[t["trial_id"]] = t["status"]
    return out


def recorded_trials(experiment_path: str, fs=None) -> dict[str, str]:
    """trial id -> status in the newest intact saved state: what a restore will see."""
    return trial_statuses(read_state(experiment_path, fs))


def _write_atomic(fs, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def save_good_copy(experiment_path: str, fs=None) -> dict | None:
    """Copy the newest state to GOOD_COPY if it parses now (one read, no retry); returns it. The
    search algorithm's files (SEARCH_FILES) that look whole are copied beside it at the same time,
    so a restore finds a searcher that agrees with the trials."""
    fs = _fs(fs)
    names = state_files(experiment_path, fs)
    if not names:
        return None
    with fs.open_input_stream(names[-1]) as f:
        raw = f.read()
    try:
        state = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("trial_data"), list):
        return None
    _write_atomic(fs, _join(experiment_path, GOOD_COPY), raw)
    for prefix, suffix in SEARCH_FILES:
        newest = _newest(fs, experiment_path, prefix, suffix)
        data = _read_whole(fs, newest, suffix) if newest else None
        if data is not None:
            _write_atomic(fs, _join(experiment_path, _good_name(prefix, suffix)), data)
    return state


# What Tune saves for its search algorithm beside the experiment state, and copies to the storage
# path the same non-atomic way: a searcher's cloudpickled state (its count of suggested trials)
# and the basic variant generator's JSON. A torn newest copy makes Tune's restore fail and start
# the whole sweep again.
SEARCH_FILES = (("searcher-state-", ".pkl"), ("search_gen_state-", ".json"))


def _good_name(prefix: str, suffix: str) -> str:
    return f"_nearid_last_good_{prefix.rstrip('-')}{suffix}"


def _newest(fs, experiment_path: str, prefix: str, suffix: str) -> str | None:
    infos = fs.get_file_info(pafs.FileSelector(str(experiment_path), allow_not_found=True))
    names = sorted(i.path for i in infos if i.base_name.startswith(prefix) and i.base_name.endswith(suffix))
    return names[-1] if names else None


def _read_whole(fs, path: str, suffix: str) -> bytes | None:
    """The file's bytes if it is whole: JSON that parses, or a pickle stream ending in its STOP
    opcode (checked without unpickling: we never load pickles); None if torn or unreadable."""
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (FileNotFoundError, OSError):
        return None
    if not data:
        return None
    if suffix == ".json":
        try:
            json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data
    return data if data.endswith(b".") else None


def _restore_search_files(fs, experiment_path: str) -> list[str]:
    """Torn newest search-algorithm files: moved aside and replaced by the last whole copy."""
    done = []
    for prefix, suffix in SEARCH_FILES:
        newest = _newest(fs, experiment_path, prefix, suffix)
        if newest is None or _read_whole(fs, newest, suffix) is not None:
            continue
        good = _read_whole(fs, _join(experiment_path, _good_name(prefix, suffix)), suffix)
        if good is None:
            continue     # nothing better to offer: Tune's own handling decides
        aside = f"{newest}.torn-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.move(newest, aside)
        _write_atomic(fs, newest, good)
        done.append(f"search state {newest} was torn: kept it as {aside}, restoring from "
                    f"{_good_name(prefix, suffix)}")
        log.warning(done[-1])
    return done


def prepare_restore(experiment_path: str, fs=None) -> str | None:
    """Make the newest state (and the search algorithm's files) restorable; returns what was done
    (None: nothing needed)."""
    fs = _fs(fs)
    done = _restore_search_files(fs, experiment_path)
    names = state_files(experiment_path, fs)
    if names and _parse(fs, names[-1]) is None:
        state = read_state(experiment_path, fs)     # retries, then the intact copy, else raises
        aside = f"{names[-1]}.torn-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.move(names[-1], aside)
        _write_atomic(fs, names[-1], json.dumps(state).encode())
        done.append(f"experiment state {names[-1]} was torn: kept it as {aside}, restoring from {GOOD_COPY}")
        log.warning(done[-1])
    return "; ".join(done) or None


def _checkpoint_dirs(fs, trial_dir: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def _checkpoint_scores(fs, trial_dir: str, score) -> dict[str, float]:
    """checkpoint dir name -> score(result) of the result reported with it (result.json lines)."""
    try:
        with fs.open_input_stream(_join(trial_dir, "result.json")) as f:
            lines = f.read().decode(errors="replace").splitlines()
    except (FileNotFoundError, OSError):
        return {}
    out = {}
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:   # a last line cut by a kill
            continue
        name, value = r.get("checkpoint_dir_name"), score(r)
        if name and value is not None:
            out[name] = float(value)
    return out


def prune_finished(experiment_path: str, state: dict, keep: int, score, mode: str = "max", fs=None,
                   done: set | None = None) -> dict[str, list[str]]:
    """For each trial TERMINATED in `state`: delete its checkpoints except the newest and the `keep`
    best by `score` (what Tune's num_to_keep keeps). Trials in `done` are skipped (and added).
    Returns trial id -> deleted checkpoint names."""
    fs, done = _fs(fs), (set() if done is None else done)
    deleted = {}
    for trial, status in trial_statuses(state).items():
        if status != "TERMINATED" or trial in done:
            continue
        trial_dir = _join(experiment_path, trial)
        names = _checkpoint_dirs(fs, trial_dir)
        scores = _checkpoint_scores(fs, trial_dir, score)
        ranked = sorted((n for n in names if n in scores), key=lambda n: scores[n], reverse=mode == "max")
        kept = set(ranked[:keep]) | set(names[-1:])
        gone = [n for n in names if n not in kept]
        for n in gone:
            fs.delete_dir(_join(trial_dir, n))
        done.add(trial)
        if gone:
            deleted[trial] = gone
            log.info("trial %s finished: deleted %d surplus checkpoints, kept %s", trial, len(gone), sorted(kept))
    return deleted


class StateKeeper(Callback):
    """Keeps `GOOD_COPY` current: at most once per `every` seconds, and at the end of the run; then
    prunes the checkpoints of trials that copy records finished (`prune_finished`, given `keep`).

    Each intact state goes to the test fault hook right after it is saved, so what the hook acts
    on is exactly what a restore would find (the hook does nothing unless NEARID_FAULT arms it)."""

    def __init__(self, experiment_path: str, fs=None, every: float = 1.0, keep: int | None = None,
                 score=None, mode: str = "max"):
        self.path, self.fs, self.every = experiment_path, fs, every
        self.keep, self.score, self.mode = keep, score, mode
        self.last = 0.0
        self.pruned: set[str] = set()

    def _keep(self) -> None:
        try:
            state = save_good_copy(self.path, self.fs)
        except OSError as e:   # a storage hiccup must never stop the sweep
            log.warning("could not save an intact copy of the experiment state: %s", e)
            return
        if state is None:
            return
        if self.keep is not None:
            try:
                prune_finished(self.path, state, self.keep, self.score, self.mode, self.fs, self.pruned)
            except OSError as e:   # surplus checkpoints left behind cost disk, never the sweep
                log.warning("could not prune finished trials' checkpoints: %s", e)
        tune_kill_after_trials(state, Path(self.path).parent / f"_fault_killed_{Path(self.path).name}")

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self._keep()

    def on_experiment_end(self, trials, **info):
        self._keep()
