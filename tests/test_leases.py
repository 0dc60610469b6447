"""One writer per table (leases), no duplicate keys at commit, manifests + `nearid verify`.

On a local root and on a real moto S3 server: two synth runs started together on one root give
every key once (one refused, or waiting with --wait); a SIGKILLed owner's lease is taken over, a
silent remote owner's after its expiry; a commit that would duplicate keys fails before anything
becomes visible; a truncated and a deleted part are found by `nearid verify` and repaired by
`--repair` + a rerun. Tiny worlds (24 identities), the session Ray runtime for in-process runs.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from nearid.io import manifest
from nearid.cli import main as cli_main
from nearid.config import StorageConfig, load_config
from nearid.io.leases import Lease, LeaseHeld, LeaseLost, files_for
from nearid.io.manifest import stage_leases
from nearid.schema import GRADED, MTG, POSITIVES
from nearid.io.storage import DuplicateKeys, Storage, TableCorrupt

pytestmark = [pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["synth.n_identities=24", "synth.n_mtg=4", "synth.n_graded=3", "synth.num_blocks=3",
         "generate.validate_sample=5", "generate.num_actors=1", "tracking.enabled=false"]
TABLE_KEYS = {t.name: list(t.key) for t in (POSITIVES, MTG, GRADED)}


# ---- roots, configs, processes ----------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """(root, endpoint or None) on a fresh local folder or a fresh prefix of the moto server."""
    if request.param == "local":
        return str(tmp_path / "root"), None
    endpoint, bucket = request.getfixturevalue("s3_server")
    return f"s3://{bucket}/leases-{uuid.uuid4().hex[:8]}", endpoint


def settings(root, endpoint, *extra) -> list[str]:
    out = [f"run.root={root}", *SMALL, *extra]
    # credentials inside the filesystem object: workers of the session's Ray never saw the env vars
    return out + ([f"storage.endpoint_url={endpoint}", "storage.access_key_id=testing",
                   "storage.secret_access_key=testing"] if endpoint else [])


def cfg_for(root, endpoint, *extra):
    return load_config(ROOT / "configs/tiny.yaml", settings(root, endpoint, *extra))


def argv_for(root, endpoint, *extra) -> list[str]:
    out = ["--config", str(ROOT / "configs/tiny.yaml")]
    for s in settings(root, endpoint, *extra):
        out += ["--set", s]
    return out


def storage_for(root, endpoint) -> Storage:
    if endpoint is None:
        return Storage.open(root)
    return Storage.open(root, StorageConfig(endpoint_url=endpoint, access_key_id="testing",
                                            secret_access_key="testing"))


def spawn(tmp_path, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """`python -m <args>` in its own session, its output kept in `<tmp_path>/<name>.log`."""
    log = tmp_path / f"{name}.log"
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT)
    proc.log_path, proc.log_file = log, out
    return proc


def finish(proc, timeout: float = 300) -> tuple[int | None, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        try:  # whatever the driver started (its own local Ray, if any) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.log_file.close()
    return rc, proc.log_path.read_text(errors="replace")


def wait_for(condition, timeout: float = 180, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def keys(st, table) -> list[tuple]:
    cols = TABLE_KEYS[table]
    t = st.read_table(table, columns=cols)
    return sorted(zip(*[t[c].to_pylist() for c in cols]))


def expected_ids(cfg) -> dict[str, set]:
    from nearid.stages.synth import benchmark_ids, make_world

    world = make_world(cfg)
    return {"positives": set(world.ids()),
            "mtg": {i for ids in benchmark_ids(world, cfg.synth.n_mtg).values() for i in ids},
            "graded": set(benchmark_ids(world, cfg.synth.n_graded)["test"])}


def assert_every_key_once(st, cfg):
    want = expected_ids(cfg)
    for table in TABLE_KEYS:
        k = keys(st, table)
        assert len(k) == len(set(k)), f"{table}: duplicated keys"
        assert {x[0] for x in k} == want[table], table
    assert len(keys(st, "positives")) == cfg.synth.n_identities * cfg.synth.n_views


def lease_record(st, table):
    cur = files_for(st).read(f"_leases/{table}.json")
    return json.loads(cur[0]) if cur else None


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


# ---- two runs on one root -----------------------------------------------------------------------
@pytest.mark.parametrize("backend, wait", [("local", False), ("s3", True)], indirect=["backend"],
                         ids=["local-refused", "s3-wait"])
def test_two_synth_runs_started_together_write_every_key_once(backend, wait, tmp_path, attach_env):
    """Local: the second run is refused; S3: the second waits with --wait (two pairs, not four)."""
    root, endpoint = backend
    argv = ["jobs.synth", *argv_for(root, endpoint), *(["--wait"] if wait else [])]
    # the winner keeps its leases until the other run has met them: refused (it exited) or
    # waiting (it said so); a waiting run then takes them and finds the file already there
    release = tmp_path / "release-leases"
    hold = {**attach_env, "NEARID_FAULT": "lease:hold_until_file:1", "NEARID_FAULT_FILE": str(release)}
    procs = [spawn(tmp_path, f"synth-{i}", argv, hold) for i in range(2)]

    def met() -> bool:
        if wait:
            return any("waiting for the lease on table" in p.log_path.read_text(errors="replace") for p in procs)
        return any(p.poll() is not None for p in procs)
    try:
        wait_for(met, timeout=300, what="the second run to meet the held leases")
        met_them = True
    except AssertionError:
        met_them = False
    release.touch()
    results = [finish(p) for p in procs]
    rcs = sorted(rc for rc, _ in results)
    logs = "\n".join(f"--- run {i} ---\n{text[-3000:]}" for i, (_, text) in enumerate(results))
    assert met_them, logs
    if wait:
        assert rcs == [0, 0], logs
        assert any("waiting for the lease on table" in text for _, text in results), logs
    else:
        assert rcs == [0, 2], logs
        refused = next(text for rc, text in results if rc == 2)
        errs = error_lines(refused)
        assert len(errs) == 1 and "Traceback" not in refused, refused[-3000:]
        assert "is being written by another run" in errs[0] and "--wait" in errs[0]
        assert "stage synth on host" in errs[0] and "pid" in errs[0] and "_leases/" in errs[0]
    st = storage_for(root, endpoint)
    assert_every_key_once(st, cfg_for(root, endpoint))
    assert all(lease_record(st, t) is None for t in TABLE_KEYS)   # released on success and refusal


HOLDER = """
import sys, time
from nearid.config import StorageConfig
from nearid.io.leases import Lease
from nearid.io.storage import Storage
root, endpoint, *pairs = sys.argv[1:]
cfg = StorageConfig(endpoint_url=endpoint, access_key_id="testing", secret_access_key="testing") \\
    if endpoint != "-" else StorageConfig()
st = Storage.open(root, cfg)
leases = [Lease(st, *p.split(":")).acquire() for p in pairs]     # table:stage
print("held", flush=True)
time.sleep(600)
"""


def hold_leases(tmp_path, root, endpoint, *pairs) -> subprocess.Popen:
    """Another run, in its own process, holding leases (`table:stage`) until it is signalled."""
    log = tmp_path / "holder.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, endpoint or "-", *pairs], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_for(lambda: log.read_text().startswith("held") or proc.poll() is not None, 60, "the holder")
    assert proc.poll() is None, log.read_text()
    return proc


def test_sigkilled_owner_lease_is_taken_over(backend, tmp_path, ray_local, caplog):
    from nearid.stages.synth import run_synth

    root, endpoint = backend
    owner = hold_leases(tmp_path, root, endpoint, *(f"{t}:synth" for t in TABLE_KEYS))
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=30)
    st = storage_for(root, endpoint)
    dead = lease_record(st, "positives")
    assert dead is not None and dead["owner"]["pid"] == owner.pid     # a SIGKILLed owner releases nothing
    cfg = cfg_for(root, endpoint, "storage.lease_expiry_s=2")
    with caplog.at_level(logging.INFO, logger="nearid.io.leases"):
        run_synth(cfg, st, ray_local)
    assert f"pid {owner.pid} on this host) is gone" in caplog.text and "took over the lease" in caplog.text
    assert_every_key_once(st, cfg)
    assert all(lease_record(st, t) is None for t in TABLE_KEYS)


def _forge(st, table, host="node-7", pid=4242, age_s=0.0, expiry_s=2.0):
    """A lease as a run on another host writes it (its heartbeat `age_s` old)."""
    now = time.time() - age_s
    rec = {"format": "nearid-lease/1", "table": table, "stage": "synth", "token": "f" * 32,
           "owner": {"host": host, "pid": pid, "pidns": "pid:[1]", "ray_job_id": "02000000"},
           "started": "2026-01-01T00:00:00Z", "started_ts": now, "heartbeat_ts": now, "expiry_s": expiry_s}
    assert files_for(st).create(f"_leases/{table}.json", json.dumps(rec).encode())


def test_a_silent_remote_owners_lease_is_taken_over_after_its_expiry(backend, caplog):
    root, endpoint = backend
    st = storage_for(root, endpoint)
    _forge(st, "positives", expiry_s=2.0)
    with pytest.raises(LeaseHeld, match=r"host node-7 pid 4242, Ray job 02000000"):
        Lease(st, "positives", "synth").acquire(0)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="nearid.io.leases"):
        lease = Lease(st, "positives", "synth").acquire(wait_s=60)
    waited = time.monotonic() - t0
    assert 1.0 < waited < 30, waited
    assert "took over the lease on table 'positives'" in caplog.text and "last heartbeat" in caplog.text
    rec = lease_record(st, "positives")
    assert rec["token"] == lease.token and rec["owner"]["pid"] == os.getpid()
    lease.release()
    assert lease_record(st, "positives") is None


def test_heartbeat_refreshes_and_a_lost_lease_stops_commits(tmp_path):
    st = storage_for(str(tmp_path), None)
    lease = Lease(st, "positives", "synth", expiry_s=0.4, key=("id", "view")).acquire()
    first = lease_record(st, "positives")["heartbeat_ts"]
    wait_for(lambda: lease_record(st, "positives")["heartbeat_ts"] > first, 10, "a heartbeat")
    other = dict(lease_record(st, "positives"), token="0" * 32, owner={"host": "node-9", "pid": 1})
    with lease._lock:                        # another run takes it over (as after a stalled heartbeat)
        assert files_for(st).replace("_leases/positives.json", json.dumps(other).encode(), lease.version)
    wait_for(lambda: lease.lost is not None, 10, "the holder to notice")
    rows = pa.Table.from_pylist([{"id": "x", "view": 0, "split": "train", "category": "c", "description": "d",
                                  "prompt": "p", "image": b"i", "mask": b"m"}], schema=POSITIVES.schema)
    with pytest.raises(LeaseLost, match="node-9"):
        st.write_table(POSITIVES, rows)
    assert not st.table_exists("positives")
    lease.release()
    assert lease_record(st, "positives")["token"] == "0" * 32    # not ours: left alone


# ---- second line of defence: keys at commit -------------------------------------------------------
def test_a_commit_that_would_duplicate_keys_fails_before_it_is_visible(backend, ray_local):
    from nearid.raytools import write_dataset
    from nearid.stages.synth import run_synth

    root, endpoint = backend
    cfg = cfg_for(root, endpoint)
    st = storage_for(root, endpoint)
    run_synth(cfg, st, ray_local)
    before = {t: manifest.load(st, t)["parts"] for t in TABLE_KEYS}
    n_pos = st.read_table(POSITIVES, columns=["id"]).num_rows
    with pytest.raises(DuplicateKeys, match=r"2 already committed .*Nothing of this write became visible"):
        st.write_table(POSITIVES, st.read_table(POSITIVES).slice(3, 2))   # write_table (importers, rejects)
    mtg = st.read_table(MTG)
    with stage_leases(st, cfg, "synth", {"mtg": ("id",)}):               # the Ray Data path the stages use
        with pytest.raises(DuplicateKeys, match="already committed"):
            write_dataset(ray_local.data.from_arrow(mtg.slice(0, 2)), st, "mtg")
        fresh = mtg.slice(0, 1).set_column(0, "id", pa.array(["brand-new"]))
        with pytest.raises(DuplicateKeys, match="repeated within the write"):
            write_dataset(ray_local.data.from_arrow(pa.concat_tables([fresh, fresh])), st, "mtg")
    assert {t: manifest.load(st, t)["parts"] for t in TABLE_KEYS} == before
    assert st.read_table(POSITIVES, columns=["id"]).num_rows == n_pos
    assert "brand-new" not in st.read_table(MTG, columns=["id"])["id"].to_pylist()
    assert not [r for r in manifest.listing(st, "mtg") if r.startswith("_staging/")]
    assert not [r for r in manifest.listing(st, "positives") if r.startswith("_staging/")]

    # a duplicate that bypassed every commit (a part copied in by hand): synth's reconcile stops
    rel = sorted(manifest.parts_on_disk(st, "mtg"))[0]
    with st.fs.open_input_stream(st.path("mtg", rel)) as f:
        data = f.read()
    with st.fs.open_output_stream(st.path("mtg", "part-copied-00000.parquet")) as f:
        f.write(data)
    with pytest.raises(RuntimeError, match="mtg has .* duplicated"):
        run_synth(cfg, st, ray_local)


def test_staging_leftovers_of_dead_writers_are_cleaned_on_start(tmp_path, ray_local):
    from nearid.stages.synth import run_synth

    root = str(tmp_path / "root")
    cfg = cfg_for(root, None)
    st = storage_for(root, None)
    run_synth(cfg, st, ray_local)
    old = time.time() - 3600
    dead = tmp_path / "root" / "positives" / "_staging" / "deadbeef0000"
    (dead / "split=train").mkdir(parents=True)
    (dead / "split=train" / "0.parquet").write_bytes(b"PAR1half")
    empty = tmp_path / "root" / "mtg" / "_staging" / "cafecafe0000"
    empty.mkdir(parents=True)
    for p in (dead / "split=train" / "0.parquet", dead / "split=train", dead, empty):
        os.utime(p, (old, old))
    run_synth(cfg, st, ray_local)
    assert not dead.exists() and not empty.exists()


# ---- manifests, verify, repair ------------------------------------------------------------------------
def _truncate(st, table, rel):
    with st.fs.open_input_stream(st.path(table, rel)) as f:
        data = f.read()
    with st.fs.open_output_stream(st.path(table, rel)) as f:
        f.write(data[: len(data) // 2])


def test_verify_finds_and_repair_fixes_a_truncated_and_a_deleted_part(backend, ray_local, capsys, tmp_path,
                                                                      attach_env):
    from nearid.stages.synth import run_synth

    root, endpoint = backend
    cfg = cfg_for(root, endpoint)
    st = storage_for(root, endpoint)
    run_synth(cfg, st, ray_local)
    clean = {t: keys(st, t) for t in TABLE_KEYS}
    m = manifest.load(st, "positives")
    assert m["key"] == ["id", "view"] and sum(e["rows"] for e in m["parts"].values()) == len(clean["positives"])
    assert all(("etag" if endpoint else "sha256") in e for e in m["parts"].values())
    ep = ["--endpoint-url", endpoint] if endpoint else []
    assert cli_main(["verify", root, *ep]) == 0

    truncated = sorted(manifest.parts_on_disk(st, "positives"))[0]
    deleted = sorted(manifest.parts_on_disk(st, "mtg"))[0]
    _truncate(st, "positives", truncated)
    st.fs.delete_file(st.path("mtg", deleted))

    with pytest.raises(TableCorrupt, match=r"truncated .*nearid verify"):
        st.read_table(POSITIVES)                  # checked against the manifest before pyarrow reads
    with pytest.raises(TableCorrupt, match="missing"):
        st.keys("mtg", ["id"])
    with pytest.raises(TableCorrupt, match="bad part") as err:
        run_synth(cfg, st, ray_local)             # a stage meeting a bad part stops, naming it
    assert f"mtg/{deleted} (missing)" in str(err.value) or f"positives/{truncated} (truncated" in str(err.value)
    assert all(lease_record(st, t) is None for t in TABLE_KEYS)
    if endpoint is None:                          # ... and as a job: one `error:` line, exit 2
        rc, text = finish(spawn(tmp_path, "synth-bad-part", ["jobs.synth", *argv_for(root, None)],
                                      attach_env))
        assert rc == 2 and "Traceback" not in text, text[-3000:]
        assert len(error_lines(text)) == 1 and (truncated in error_lines(text)[0] or deleted in error_lines(text)[0])

    capsys.readouterr()
    assert cli_main(["verify", root, *ep]) == 1
    out = capsys.readouterr().out
    assert f"positives/{truncated}: truncated" in out and f"mtg/{deleted}: missing" in out, out
    assert cli_main(["verify", root, "graded", *ep]) == 0   # one table
    assert cli_main(["verify", root, "--repair", *ep]) == 0
    out = capsys.readouterr().out
    assert "_quarantine/" in out and "rerun jobs.synth" in out, out
    moved = [r for r in manifest.listing(st, "positives") if r.startswith("_quarantine/")]
    assert any(r.endswith(truncated) for r in moved)          # moved aside, never deleted
    assert truncated not in manifest.load(st, "positives")["parts"]
    assert deleted not in manifest.load(st, "mtg")["parts"]
    assert not st.is_done("positives")
    assert cli_main(["verify", root, *ep]) == 0

    summary = run_synth(cfg, st, ray_local)                   # recomputes exactly the lost keys
    assert 0 < summary["rendered_now"] < cfg.synth.n_identities
    assert {t: keys(st, t) for t in TABLE_KEYS} == clean
    assert cli_main(["verify", root, *ep]) == 0


def test_verify_flags_an_altered_part_and_user_mistakes(tmp_path, capsys):
    st = storage_for(str(tmp_path), None)
    rows = [{"id": f"x{i}", "view": 0, "split": "train", "category": "c", "description": "d", "prompt": "p",
             "image": bytes([i]), "mask": b"m"} for i in range(3)]
    st.write_table(POSITIVES, pa.Table.from_pylist(rows, schema=POSITIVES.schema))
    rel = next(iter(manifest.parts_on_disk(st, "positives")))
    path = tmp_path / "positives" / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                  # same size, other bytes
    path.write_bytes(bytes(data))
    assert cli_main(["verify", str(tmp_path), "--quick"]) == 0     # sizes only
    assert cli_main(["verify", str(tmp_path)]) == 1
    assert "altered" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path), "nosuch"]) == 2
    assert "error: no table 'nosuch'" in capsys.readouterr().err


# ---- generate and extract hold their leases too ---------------------------------------------------
def test_generate_and_extract_refuse_while_another_run_holds_their_lease(tmp_path, ray_local):
    from nearid.stages.extract import run_extract
    from nearid.stages.generate import run_generate
    from nearid.stages.synth import run_synth

    root = str(tmp_path / "root")
    cfg = cfg_for(root, None, "generate.settings={flux: {backend: procedural, batch_size: 16}}")
    st = storage_for(root, None)
    run_synth(cfg, st, ray_local)
    holder = hold_leases(tmp_path, root, None, "distractors:generate", "features:extract")
    try:
        with pytest.raises(LeaseHeld, match=rf"stage generate on host .* pid {holder.pid}"):
            run_generate(cfg, st, ray_local)
        with pytest.raises(LeaseHeld, match=rf"table 'features' .*stage extract on host .* pid {holder.pid}"):
            run_extract(cfg, st, ray_local)
        assert not st.table_exists("distractors") and not st.table_exists("features")
        holder.send_signal(signal.SIGTERM)        # released by the SIGTERM handler, then exit
        assert holder.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if holder.poll() is None:
            holder.kill()
    assert lease_record(st, "distractors") is None and lease_record(st, "features") is None
    summary = run_generate(cfg, st, ray_local)
    assert summary["flux"]["duplicates"] == 0 and summary["flux"]["ok"] == cfg.synth.n_identities * 3
    assert lease_record(st, "distractors") is None
