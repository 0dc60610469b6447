"""A model dir pins its scoring protocol in protocol.json; `nearid score --protocol` prints it and
`from_pretrained` refuses a dir whose protocol.json disagrees with what loads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nearid import cli
from nearid.model import NearIDModel
from nearid.protocol import PROTOCOL_FILE, ProtocolMismatch, check_protocol
from tests.test_released_model import MEAN, STD, VISION, write_released

ROOT = Path(__file__).resolve().parents[1]


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture()
def tiny_dir(tmp_path) -> Path:
    return NearIDModel.from_backbone("tiny-random", head_seed=1).save_pretrained(tmp_path / "tiny")


def test_save_writes_the_protocol_known_answer(tiny_dir):
    p = json.loads((tiny_dir / PROTOCOL_FILE).read_text())
    assert p == {
        "protocol_version": 1,
        "backbone": {"id": "tiny-random", "kind": "siglip", "revision": None, "weights": "by id", "seed": 0},
        "resolution": 64,                       # TINY_DEFAULTS image_size
        "preprocessing": {"processor": "SiglipImageProcessorPil", "convert_rgb": True,
                          "resize": {"size": {"height": 64, "width": 64}, "resample": "bicubic"},
                          "center_crop": None, "rescale_factor": 1 / 255,
                          "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
        "dtype": "float32", "readout": "map_head", "tokens": 64, "embedding_dim": 64,
        "normalize": True, "similarity": "cosine", "score_range": [-1.0, 1.0],
    }
    model = NearIDModel.from_pretrained(tiny_dir)
    assert model.protocol == p and str(tiny_dir / PROTOCOL_FILE) in model.protocol_source


def test_cli_prints_the_protocol(tiny_dir, capsys):
    assert cli.main(["score", "--protocol", "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    lines = dict(ln.split(":", 1) for ln in out.strip().splitlines())
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    assert lines["backbone"] == "tiny-random (siglip; weights by id; seed 0)"
    assert lines["revision"] == "unknown"
    assert lines["resolution"] == "64x64 px, 64 tokens"
    assert lines["resize"] == "height 64, width 64 (bicubic)" and lines["crop"] == "none"
    assert lines["normalise"] == "mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5]"
    assert lines["dtype"].startswith("float32") and lines["readout"].startswith("map_head")
    assert lines["embedding dim"] == "64" and lines["score"] == "cosine in [-1, 1]"
    assert cli.main(["score", "a.png", "--protocol", "--model", str(tiny_dir)]) == 2


def test_fp16_dir_pins_float16_and_loads(tmp_path, capsys):
    d = NearIDModel.from_backbone("tiny-random").to(torch.float16).save_pretrained(tmp_path / "half")
    assert json.loads((d / PROTOCOL_FILE).read_text())["dtype"] == "float16"
    model = NearIDModel.from_pretrained(d)                   # loads as float32, protocol still holds
    assert model.head.probe.dtype == torch.float32 and model.protocol["dtype"] == "float16"


def test_converted_released_checkpoint_pins_its_own_processor(tmp_path, capsys):
    released = write_released(tmp_path / "released")
    model = NearIDModel.from_pretrained(released)            # no protocol.json: still loads
    assert "no protocol.json" in model.protocol_source
    assert model.protocol["preprocessing"]["normalize"] == {"mean": MEAN, "std": STD}
    assert model.protocol["dtype"] == "float16" and model.protocol["backbone"]["weights"] == "in model dir"
    assert model.protocol["resolution"] == VISION["image_size"]
    assert model.protocol["preprocessing"]["resize"]["resample"] == "bilinear"   # resample 2
    assert cli.main(["score", "--protocol", "--model", str(released)]) == 0
    out = capsys.readouterr().out
    assert f"mean {MEAN} std {STD}" in out and "derived from config.json (no protocol.json)" in out
    assert cli.main(["convert", str(released), str(tmp_path / "ours")]) == 0
    saved = json.loads((tmp_path / "ours" / PROTOCOL_FILE).read_text())
    assert {k: v for k, v in saved.items() if k != "backbone"} == \
        {k: v for k, v in model.protocol.items() if k != "backbone"}
    assert NearIDModel.from_pretrained(tmp_path / "ours").protocol == saved


def _weights_included_dir(tmp_path) -> Path:
    return NearIDModel.from_backbone("tiny-random").save_pretrained(tmp_path / "full", save_backbone=True)


# each: (how the dir is changed after saving, the field the error must name)
EDITS = {
    "resolution": (lambda d: _edit(d / PROTOCOL_FILE, lambda p: p.update(resolution=384)), "resolution"),
    "mean": (lambda d: _edit(d / PROTOCOL_FILE, lambda p: p["preprocessing"]["normalize"].update(
        mean=[0.485, 0.456, 0.406])), "preprocessing.normalize.mean"),
    "dtype": (lambda d: _edit(d / PROTOCOL_FILE, lambda p: p.update(dtype="bfloat16")), "dtype"),
    "embedding_dim": (lambda d: _edit(d / PROTOCOL_FILE, lambda p: p.update(embedding_dim=1152)), "embedding_dim"),
    "backbone": (lambda d: _edit(d / PROTOCOL_FILE, lambda p: p["backbone"].update(id="so400m-random")),
                 "backbone.id"),
    "readout": (lambda d: _edit(d / PROTOCOL_FILE, lambda p: p.update(readout="cls")), "readout"),
    "missing_field": (lambda d: _edit(d / PROTOCOL_FILE, lambda p: p.pop("preprocessing")), "preprocessing"),
    "version": (lambda d: _edit(d / PROTOCOL_FILE, lambda p: p.update(protocol_version=2)), "protocol_version"),
    # the config side: its saved image processor now normalises differently than the pin says
    "config_std": (lambda d: _edit(d / "config.json", lambda c: c["backbone"]["image_processor"]["settings"].update(
        image_std=[0.2, 0.2, 0.2])), "preprocessing.normalize.std"),
    "config_resize": (lambda d: _edit(d / "config.json", lambda c: c["backbone"]["image_processor"]["settings"].update(
        resample=2)), "preprocessing.resize.resample"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_a_changed_dir_is_refused_naming_the_field(case, tmp_path, capsys):
    edit, field = EDITS[case]
    d = _weights_included_dir(tmp_path)
    NearIDModel.from_pretrained(d)                           # loads before the change
    edit(d)
    with pytest.raises(ProtocolMismatch, match=rf"{PROTOCOL_FILE}: field {field}\b"):
        NearIDModel.from_pretrained(d)


def test_cli_mismatch_is_one_error_line_exit_2(tmp_path):
    d = _weights_included_dir(tmp_path)
    EDITS["mean"][0](d)
    p = subprocess.run([sys.executable, "-m", "nearid.cli", "score", "--protocol", "--model", str(d)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and str(d / PROTOCOL_FILE) in errors[0] and "preprocessing.normalize.mean" in errors[0]
    assert "Traceback" not in p.stderr


def test_dirs_without_protocol_json_still_load(tiny_dir):
    want = NearIDModel.from_pretrained(tiny_dir).protocol
    (tiny_dir / PROTOCOL_FILE).unlink()
    model = NearIDModel.from_pretrained(tiny_dir)
    assert model.protocol == want and "no protocol.json" in model.protocol_source


def test_revision_is_compared_only_where_both_sides_know_it():
    base = {"protocol_version": 1, "backbone": {"id": "x", "revision": "abc"}, "resolution": 8}
    check_protocol(base, {**base, "backbone": {"id": "x", "revision": None}}, "p.json")      # unknown: ok
    check_protocol({**base, "backbone": {"id": "x", "revision": None}}, base, "p.json")
    with pytest.raises(ProtocolMismatch, match=r"p.json: field backbone.revision is \"abc\" .* \"def\""):
        check_protocol(base, {**base, "backbone": {"id": "x", "revision": "def"}}, "p.json")
    with pytest.raises(ProtocolMismatch, match="field resolution"):
        check_protocol(base, {**base, "resolution": 8.5}, "p.json")
    check_protocol(base, {**base, "resolution": 8.0}, "p.json")                              # same number
