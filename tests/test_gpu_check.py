"""`bench/gpu_check.py --smoke`: the one-shot GPU check runs end to end on CPU at tiny dims (CI has
no GPU), so the script a person runs on an H100/H200 is not first executed there."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_smoke_runs_every_section_and_writes_its_json(tmp_path, attach_env):
    """On the session's Ray runtime (RAY_ADDRESS), as the pipeline section's job attaches to it."""
    import os

    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=840, env={**os.environ, **attach_env})
    tail = p.stdout[-4000:] + p.stderr[-4000:]
    assert p.returncode == 0, tail
    res = json.loads(out.read_text())
    assert res["smoke"] is True and res["device"] == "cpu", tail
    errors = {k: v for k, v in res.items() if k.endswith("_error") and "compiled" not in k}
    assert not errors, (errors, tail)            # torch.compile may be unavailable on a CPU box
    assert res["pipeline_small_rc"] == 0, res.get("pipeline_small_tail", tail)
    for key in ("extract_img_s", "raydata_extract_img_s", "bare_extract_img_s", "train_step_s_cached",
                "train_step_s_images", "unet_step_s_b1", "unet_step_s_b8"):
        assert res[key] > 0, (key, tail)
    assert "| measurement | value |" in p.stdout
