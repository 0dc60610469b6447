"""`python -m bench.chaos`: worker nodes of a simulated 4-node Ray cluster removed without grace
mid-generate, mid-extract and mid-training; every key exactly once, verify clean, training resumed
from its checkpoint to the same step count (in a subprocess: the cluster is its own Ray)."""
from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_losing_worker_nodes_loses_no_key_and_training_resumes(tmp_path, job_process):
    out = tmp_path / "chaos.json"
    rc, _ = job_process.run(["bench.chaos", "--json", str(out), "--root", str(tmp_path / "root"),
                             "--identities", "24"], timeout=1100)
    assert rc == 0, job_process.tail()
    res = json.loads(out.read_text())
    assert res["nodes_killed"] == 5, job_process.tail()             # 2 + 2 + the Train worker's node
    assert res["found"] == res["expected"] and res["duplicates"] == {"distractors": 0, "features": 0}, res
    assert res["verify_rc"] == 0, res["verify"]
    train = res["train"]
    assert train["final_step"] == train["expected_steps"] and train["resumed_from_step"] > 0, train
    assert (tmp_path / "root" / "features").is_dir()                # the root stays
