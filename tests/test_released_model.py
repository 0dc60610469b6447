"""The released NearID checkpoint layout (`Aleksandar/nearid-siglip2`) loads as is, without its code.

A tiny random checkpoint is written in that exact layout: config.json as the reference's
NearIDConfig saves it (model_type nearid, vision_config, embed_dim, normalize_embeddings,
auto_map), the whole SigLIP tower in fp16 under `backbone.vision_model.` (transformers 4.x
names) or `backbone.` (5.x names), and a preprocessor_config.json with non-default mean/std.
The expected embedding is computed the reference's way, independently of our loader: a
transformers SiglipVisionModel loaded by transformers from those weights, pooler_output,
L2-normalised.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, SiglipVisionConfig, SiglipVisionModel

from nearid.backbones.core import siglip_processor
from nearid.cli import main as cli_main
from nearid.config import ExtractConfig
from nearid.model import NearIDModel
from nearid.convert import convert_released
from nearid.stages.extract import build_processor, load_scorer

ROOT = Path(__file__).resolve().parents[1]
# The reference's vision_config keys (its _DEFAULT_VISION_CONFIG), at a tiny size.
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=48, patch_size=8, num_channels=3, hidden_act="gelu_pytorch_tanh",
              layer_norm_eps=1e-6, attention_dropout=0.0)
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]  # not SigLIP's 0.5 / 0.5: proves whose processor runs
REMOTE_CODE = 'raise RuntimeError("the checkpoint\'s Python code must never run")\n'


def released_config() -> dict:
    """config.json as transformers 4.x writes the reference NearIDConfig."""
    return {
        "architectures": ["NearIDModel"],
        "auto_map": {"AutoConfig": "configuration_nearid.NearIDConfig",
                     "AutoModel": "modeling_nearid.NearIDModel"},
        "embed_dim": VISION["hidden_size"],
        "model_type": "nearid",
        "normalize_embeddings": True,
        "torch_dtype": "float16",
        "transformers_version": "4.57.1",
        "vision_config": dict(VISION),
    }


def preprocessor_config() -> dict:
    """preprocessor_config.json as transformers 4.x writes a SiglipImageProcessor."""
    size = VISION["image_size"]
    return {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": MEAN, "image_processor_type": "SiglipImageProcessor", "image_std": STD,
            "processor_class": "SiglipProcessor", "resample": 2, "rescale_factor": 1 / 255,
            "size": {"height": size, "width": size}}


def tower_tensors(tmp: Path, seed: int = 5) -> dict[str, torch.Tensor]:
    """A random SigLIP tower saved by transformers itself (real 5.x names), every weight perturbed
    so layer norms and biases are not at their init values."""
    torch.manual_seed(seed)
    tower = SiglipVisionModel(SiglipVisionConfig(**VISION))
    with torch.no_grad():
        for param in tower.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    tower.save_pretrained(tmp)
    return load_file(tmp / "model.safetensors")


def write_released(directory: Path, naming: str = "4x", seed: int = 5) -> Path:
    """The released layout: config.json, fp16 model.safetensors, preprocessor_config.json, code files."""
    directory.mkdir(parents=True)
    tensors = tower_tensors(directory.parent / f"{directory.name}-hf", seed)
    # transformers 4.x put SiglipVisionModel weights under `vision_model.`; NearIDModel adds `backbone.`
    prefix = "backbone.vision_model." if naming == "4x" else "backbone."
    save_file({prefix + k: v.half().contiguous() for k, v in tensors.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(released_config(), indent=2, sort_keys=True) + "\n")
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
    for code in ("configuration_nearid.py", "modeling_nearid.py"):
        (directory / code).write_text(REMOTE_CODE)
    return directory


def reference_tower(directory: Path) -> SiglipVisionModel:
    """transformers' own loader over the checkpoint's tensors (minus the NearIDModel `backbone.`
    level): 4.x `vision_model.` names are mapped by transformers, not by us."""
    hf_dir = Path(tempfile.mkdtemp(prefix=f"{directory.name}-reference-", dir=directory.parent))
    SiglipVisionConfig(**VISION).save_pretrained(hf_dir)
    tensors = load_file(directory / "model.safetensors")
    save_file({k.removeprefix("backbone."): v for k, v in tensors.items()}, str(hf_dir / "model.safetensors"),
              metadata={"format": "pt"})
    tower, info = SiglipVisionModel.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return tower.eval()


@torch.no_grad()
def reference_embeddings(directory: Path, images: list[Image.Image], processor=None) -> torch.Tensor:
    """The reference get_image_features: F.normalize(tower(pixels).pooler_output)."""
    processor = processor or AutoImageProcessor.from_pretrained(directory)  # as the reference does
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    return F.normalize(reference_tower(directory)(pixel_values=pixels).pooler_output, p=2, dim=-1)


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 56, 3), dtype=np.uint8), "RGB") for i in range(3)]
    return out + [out[0].convert("L")]


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return write_released(tmp_path_factory.mktemp("released") / "nearid-siglip2")


@pytest.mark.parametrize("naming", ["4x", "5x"])
def test_released_layout_matches_reference_get_image_features(tmp_path, naming):
    directory = write_released(tmp_path / "ckpt", naming)
    images = sample_images()
    expected = reference_embeddings(directory, images)
    model = NearIDModel.from_pretrained(directory)
    got = model.embed(images, batch_size=3)
    diff = (got - expected).abs().max().item()
    print(f"released layout ({naming} names): max |ours - reference| = {diff:.3g}")
    assert diff < 1e-3
    # fp16 weights arrive in float32 on the CPU; the checkpoint's processor is the one used
    assert model.head.probe.dtype == torch.float32 and model.backbone.dtype == torch.float32
    assert list(model.backbone.image_processor.image_mean) == MEAN
    assert list(model.backbone.image_processor.image_std) == STD
    default = reference_embeddings(directory, images, processor=siglip_processor(VISION["image_size"]))
    assert (default - expected).abs().max() > 1e-2, "mean/std should matter: the test would prove nothing"
    # the MAP head is the tower's: slow and fast paths and the backbone's own readout agree
    tokens = model.backbone.tokens(model.backbone.preprocess(images))
    torch.testing.assert_close(model.embed_tokens(tokens, fast=False), got, atol=1e-5, rtol=0)
    torch.testing.assert_close(F.normalize(model.backbone.readouts(tokens=tokens)["map"], dim=-1), got,
                               atol=1e-5, rtol=0)
    assert model.backbone.num_tokens == (VISION["image_size"] // VISION["patch_size"]) ** 2
    positions = model.backbone.num_tokens
    assert torch.equal(model.backbone.model.embeddings.position_ids, torch.arange(positions)[None])


def test_asked_dtype(released):
    images = sample_images()
    reference = reference_embeddings(released, images)
    for dtype, atol in ((torch.bfloat16, 0.05), (torch.float16, 0.01)):
        model = NearIDModel.from_pretrained(released, dtype=dtype)
        assert model.head.probe.dtype == dtype and model.backbone.dtype == dtype
        torch.testing.assert_close(model.embed(images), reference, atol=atol, rtol=0)


def save_pngs(directory: Path) -> list[str]:
    paths = []
    for i, image in enumerate(sample_images()[:2]):
        paths.append(str(directory / f"img{i}.png"))
        image.save(paths[-1])
    return paths


def test_cli_score_prints_the_reference_cosine(released, tmp_path, capsys):
    ref, gen = save_pngs(tmp_path)
    emb = reference_embeddings(released, [Image.open(ref), Image.open(gen)])
    expected = float(emb[0] @ emb[1])
    assert cli_main(["score", ref, gen, "--model", str(released)]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(expected, abs=2e-4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "nearid.cli", "score", ref, gen, "--model", str(released)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, output
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=2e-4), output


def test_convert_round_trip(released, tmp_path, capsys):
    out = tmp_path / "converted"
    assert cli_main(["convert", str(released), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "nearid-model" and config["backbone"]["weights_included"] is True
    assert config["backbone"]["image_processor"]["settings"]["image_mean"] == MEAN
    tensors = load_file(out / "model.safetensors")
    assert "head.probe" in tensors and "backbone.embeddings.patch_embedding.weight" in tensors
    assert {t.dtype for t in tensors.values()} == {torch.float16}  # stored as the release: lossless
    original = NearIDModel.from_pretrained(released)
    converted = NearIDModel.from_pretrained(out)
    assert converted.backbone.dtype == torch.float32
    assert torch.equal(converted.embed(sample_images()), original.embed(sample_images()))
    fp32 = convert_released(released, tmp_path / "fp32", dtype=torch.float32)
    assert load_file(fp32 / "model.safetensors")["head.probe"].dtype == torch.float32
    with pytest.raises(ValueError, match="output dir is the source dir"):
        convert_released(released, released)


def test_convert_help_and_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert "OUT" in capsys.readouterr().out
    assert cli_main(["convert", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "absent" in err[0]


def test_unknown_model_type_and_missing_weights_are_named(tmp_path):
    directory = write_released(tmp_path / "ckpt")
    config_path = directory / "config.json"
    config_path.write_text(json.dumps({**released_config(), "model_type": "clip"}))
    with pytest.raises(ValueError, match=rf"{config_path}: model_type 'clip' is not a released NearID"):
        NearIDModel.from_pretrained(directory)
    config_path.write_text(json.dumps(released_config()))
    (directory / "model.safetensors").rename(directory / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match=str(directory / "model.safetensors")):
        NearIDModel.from_pretrained(directory)


def test_wrong_tensors_and_processor_are_named(tmp_path):
    directory = write_released(tmp_path / "ckpt")
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    del tensors["backbone.vision_model.head.probe"]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"missing tensors \['backbone.vision_model.head.probe'\]"):
        NearIDModel.from_pretrained(directory)
    directory = write_released(tmp_path / "ckpt2")
    processor = directory / "preprocessor_config.json"
    processor.write_text(json.dumps({**preprocessor_config(), "image_processor_type": "Siglip2ImageProcessor"}))
    with pytest.raises(ValueError, match=rf"{processor}: image_processor_type 'Siglip2ImageProcessor'"):
        NearIDModel.from_pretrained(directory)
    processor.write_text(json.dumps({**preprocessor_config(), "size": {"height": 40, "width": 40}}))
    with pytest.raises(ValueError, match=r"resized to 40 px but the tower .* takes 48 px"):
        NearIDModel.from_pretrained(directory)


def test_extraction_job_model_dir_uses_the_checkpoint_processor(released):
    ecfg = ExtractConfig(model_dir=str(released))
    processor = build_processor(ecfg)  # the CPU decode stage: config and processor only
    backbone, model = load_scorer(ecfg)
    images = sample_images()
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, backbone.preprocess(images))
    torch.testing.assert_close(model.embed_tokens(backbone.tokens(pixels)), reference_embeddings(released, images),
                               atol=1e-3, rtol=0)


def test_hub_id_offline_error_and_online_snapshot(released, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Aleksandar/nearid-siglip2.*HF_HUB_OFFLINE is set"):
        NearIDModel.from_pretrained("Aleksandar/nearid-siglip2")
    import huggingface_hub

    calls = []

    def snapshot(repo_id, **kwargs):  # stands in for the network: hands back a downloaded snapshot
        calls.append((repo_id, kwargs))
        return str(released)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    model = NearIDModel.from_pretrained("Aleksandar/nearid-siglip2")
    assert model.backbone.name == "Aleksandar/nearid-siglip2"
    (repo_id, kwargs), = calls
    assert repo_id == "Aleksandar/nearid-siglip2"
    assert not any(p.endswith((".py", ".bin")) or p == "*" for p in kwargs["allow_patterns"])
    torch.testing.assert_close(model.embed(sample_images()), reference_embeddings(released, sample_images()),
                               atol=1e-3, rtol=0)


def test_released_layout_from_s3(released, tmp_path, s3_server):
    endpoint, bucket = s3_server
    options = {"endpoint_url": endpoint, "key": os.environ["AWS_ACCESS_KEY_ID"],
               "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}
    fs = s3fs.S3FileSystem(**options)
    for file in released.iterdir():
        fs.put_file(str(file), f"{bucket}/released/nearid-siglip2/{file.name}")
    url = f"s3://{bucket}/released/nearid-siglip2"
    model = NearIDModel.from_pretrained(url, storage_options=options, cache_dir=tmp_path / "cache")
    assert model.backbone.name == url
    assert torch.equal(model.embed(sample_images()), NearIDModel.from_pretrained(released).embed(sample_images()))


def test_near_id_score_metric_loads_the_released_layout(released, tmp_path):
    from nearid import NearIDScore

    ref, gen = save_pngs(tmp_path)
    emb = reference_embeddings(released, [Image.open(ref), Image.open(gen)])
    metric = NearIDScore(str(released))
    metric.update([ref, ref], [gen, ref])
    got = metric.compute()["scores"]
    assert got == pytest.approx([float(emb[0] @ emb[1]), 1.0], abs=2e-4)
