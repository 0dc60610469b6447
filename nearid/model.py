"""NearIDModel: a frozen backbone + a trainable MAP head, saved as a Hugging Face style dir.

A model directory holds `config.json` (format version, backbone reference, head dims),
`model.safetensors` (head weights under `head.`, backbone weights under `backbone.` only
when the backbone cannot be rebuilt from its name), `protocol.json` (the scoring protocol it
pins: backbone id/revision, resolution, preprocessing, dtype, readout, embedding dim; checked on
load, see nearid/protocol.py) and a `README.md` model card. Loading
reads safetensors only and refuses directories that contain pickle-based weight files.
`from_pretrained` also loads the released NearID checkpoint layout (see nearid/released.py)
from a local dir, an `s3://` prefix or a Hugging Face Hub id, without running its code.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import fsspec
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from nearid.backbones.core import KIND_CLASSES, Backbone, processor_from_spec
from nearid.backbones.dispatch import load_backbone
from nearid.head import MAPHead
from nearid.numerics import rowwise
from nearid.protocol import PROTOCOL_FILE, check_protocol, model_protocol, read_protocol, write_protocol
from nearid.released import check_tensor_names, is_released_config, load_released, stored_dtype
from nearid.io.storage import download_s3_dir

FORMAT_NAME = "nearid-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What a Hub snapshot fetches: configs, safetensors, the card; never code or pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class NearIDModel(nn.Module):
    """Identity embedding model: backbone tokens -> MAP head -> L2-normalised [B, D]."""

    def __init__(self, backbone: Backbone, head: MAPHead) -> None:
        super().__init__()
        if head.hidden_size != backbone.hidden_size:
            raise ValueError(f"head hidden_size {head.hidden_size} != backbone hidden_size {backbone.hidden_size}")
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_backbone(
        cls,
        name: str,
        *,
        head_seed: int = 0,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        **backbone_kwargs: Any,
    ) -> "NearIDModel":
        """Load backbone `name` (see `load_backbone`) and start the head from its pretrained
        MAP head; backbones without one (CLIP, DINOv2) get a fresh head seeded by `head_seed`."""
        backbone = load_backbone(name, dtype=dtype, device=device, **backbone_kwargs)
        head = initial_head(backbone, head_seed)
        head = head.to(device=device, dtype=dtype) if dtype else head.to(device)
        return cls(backbone, head)

    @property
    def embedding_dim(self) -> int:
        return self.head.hidden_size

    def embed_tokens(self, tokens: torch.Tensor, fast: bool = True) -> torch.Tensor:
        """Backbone tokens [B, T, D] -> unit-norm embeddings [B, D] (differentiable). Without
        autograd (scoring, evaluation) each image is pooled on its own (`numerics.rowwise`), so an
        embedding does not depend on the batch it came in."""
        head_param = self.head.probe
        tokens = tokens.to(device=head_param.device, dtype=head_param.dtype)
        if torch.is_grad_enabled():
            return F.normalize(self.head(tokens, fast=fast), dim=-1)
        return F.normalize(rowwise(lambda t: self.head(t, fast=fast), tokens), dim=-1)

    @torch.no_grad()
    def embed(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """PIL images -> unit-norm embeddings [N, D] (float32, CPU), in batches."""
        if not images:
            return torch.empty(0, self.embedding_dim)
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = self.backbone.preprocess(images[start:start + batch_size])
            chunks.append(self.embed_tokens(self.backbone.tokens(pixels)).float().cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def score(self, a_images: list[Image.Image], b_images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Cosine similarity of each pair (a_images[i], b_images[i]): [N]."""
        if len(a_images) != len(b_images):
            raise ValueError(f"score needs equal lengths, got {len(a_images)} and {len(b_images)}")
        return (self.embed(a_images, batch_size) * self.embed(b_images, batch_size)).sum(dim=-1)

    # ---- saving ---------------------------------------------------------------------------

    def _config_dict(self, backbone_included: bool) -> dict[str, Any]:
        backbone = self.backbone
        backbone_cfg: dict[str, Any] = {
            "name": backbone.name,
            "kind": backbone.kind,
            "weights_included": backbone_included,
            "hidden_size": backbone.hidden_size,
            "image_size": backbone.image_size,
            "num_tokens": backbone.num_tokens,
            "identity": backbone.identity(),   # what the evaluation compares with its features' identity
        }
        if backbone.seed is not None:
            backbone_cfg["seed"] = backbone.seed
        if backbone.name == "tiny-random":
            backbone_cfg["tiny_overrides"] = backbone.tiny_overrides
        if backbone_included:
            # Enough to rebuild the architecture and preprocessing offline, without the name.
            backbone_cfg["hf_config"] = backbone.model.config.to_dict()
            backbone_cfg["image_processor"] = backbone.processor_spec()
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "backbone": backbone_cfg,
            "head": self.head.dims(),
            "embedding_dim": self.embedding_dim,
            "normalize": True,
            "similarity": "cosine",
        }

    def save_pretrained(
        self, directory: str | os.PathLike, metrics: dict | None = None, save_backbone: bool | None = None
    ) -> Path:
        """Write config.json, model.safetensors, protocol.json and README.md into `directory`.

        `save_backbone=None` stores backbone weights only when the backbone cannot be
        reloaded by name; False with such a backbone raises ValueError.
        """
        if save_backbone is None:
            save_backbone = not self.backbone.reloadable
        elif not save_backbone and not self.backbone.reloadable:
            raise ValueError(f"backbone {self.backbone.name!r} cannot be reloaded by name: save_backbone must be True")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"head.{key}": value for key, value in self.head.state_dict().items()}
        if save_backbone:
            tensors.update({f"backbone.{key}": value for key, value in self.backbone.model.state_dict().items()})
        # safetensors refuses shared or strided storage: give every tensor its own memory.
        tensors = {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        config = self._config_dict(save_backbone)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_protocol(out, model_protocol(self, dtype=tensors[HEAD_DTYPE_TENSOR].dtype,
                                           weights_included=save_backbone))
        (out / CARD_FILE).write_text(model_card(config, metrics))
        return out

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        storage_options: dict | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> "NearIDModel":
        """Load a directory written by `save_pretrained`, or a released NearID checkpoint
        (`model_type: nearid`, fp16 SigLIP tower; nearid/released.py), from a local dir, an
        `s3://` prefix or a Hugging Face Hub id (see `resolve_model_dir`).

        Safetensors only, never remote code. Weights load in float32 unless `dtype` is given.
        Raises ValueError for pickle-based files in the dir, an unknown config or
        missing/unexpected/misshapen tensors, FileNotFoundError for a missing dir,
        config.json or weights file.
        """
        path_str = str(path)
        directory = resolve_model_dir(path_str, storage_options, cache_dir)
        pickled = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ValueError(f"{path_str}: NearIDModel.from_pretrained refuses pickle-based file(s) {pickled}")
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in {path_str} (looked for {config_path})")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path}: not valid JSON ({err})") from None
        if is_released_config(config):
            backbone, head = load_released(directory, config, config_path, name=path_str)
            model = _with_protocol(cls(backbone, head), directory, weights_included=True)
            return model.to(device=device, dtype=dtype) if dtype else model.to(device)
        _check_format(config, config_path)
        weights_path = directory / WEIGHTS_FILE
        if not weights_path.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path_str} (looked for {weights_path})")
        tensors = load_file(str(weights_path))

        head = MAPHead.from_config(**config["head"])
        expected = {f"head.{key}": value.shape for key, value in head.state_dict().items()}
        backbone_cfg = config["backbone"]
        if backbone_cfg.get("weights_included"):
            backbone = _backbone_from_config(backbone_cfg)
            expected.update({f"backbone.{k}": v.shape for k, v in backbone.model.state_dict().items()})
        else:
            backbone = load_backbone(
                backbone_cfg["name"],
                tiny_overrides=backbone_cfg.get("tiny_overrides") or None,
                seed=backbone_cfg.get("seed", 0),
                storage_options=storage_options,
                cache_dir=cache_dir,
            )
        check_tensor_names(tensors, expected, weights_path)
        head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
        if backbone_cfg.get("weights_included"):
            backbone.model.load_state_dict(
                {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
            )
        model = _with_protocol(cls(backbone, head), directory, bool(backbone_cfg.get("weights_included")))
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)


HEAD_DTYPE_TENSOR = "head.probe"   # the stored dtype a protocol names is this tensor's


def _with_protocol(model: NearIDModel, directory: Path, weights_included: bool) -> NearIDModel:
    """Set `model.protocol`: protocol.json once it agrees with what loaded (ProtocolMismatch naming
    the field otherwise), or the protocol derived from the loaded model for dirs without one."""
    loaded = model_protocol(model, dtype=stored_dtype(directory, HEAD_DTYPE_TENSOR),
                            weights_included=weights_included)
    saved = read_protocol(directory)
    if saved is None:
        model.protocol, model.protocol_source = loaded, f"derived from {CONFIG_FILE} (no {PROTOCOL_FILE})"
    else:
        check_protocol(saved, loaded, directory / PROTOCOL_FILE)
        model.protocol, model.protocol_source = saved, f"{directory / PROTOCOL_FILE} (checked on load)"
    return model


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_dir(
    path: str | os.PathLike, storage_options: dict | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A local directory holding the model at `path`: a local dir as is; an `s3://` prefix copied
    into the cache (`download_s3_dir`); otherwise an `owner/name` Hugging Face Hub id, fetched with
    `snapshot_download` (JSON, safetensors and the card only) unless HF_HUB_OFFLINE is set.
    Raises FileNotFoundError saying which of these failed."""
    path_str = str(path)
    if path_str.startswith("s3://"):
        return download_s3_dir(path_str, storage_options, cache_dir)
    local = Path(path_str).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise FileNotFoundError(f"model directory not found: {path_str} is a file, not a directory")
    if not _HUB_ID.match(path_str):
        raise FileNotFoundError(f"model directory not found: {path_str}")
    if _hub_offline():
        raise FileNotFoundError(f"model directory not found: {path_str} (not a local dir, and HF_HUB_OFFLINE is "
                                "set, so it is not fetched as a Hugging Face Hub id)")
    from huggingface_hub import snapshot_download

    try:
        fetched = snapshot_download(repo_id=path_str, allow_patterns=HUB_PATTERNS,
                                    cache_dir=str(Path(cache_dir) / "hf") if cache_dir else None)
    except Exception as err:  # network, auth, unknown repo: one clear message either way
        raise FileNotFoundError(f"model directory not found: {path_str} (not a local dir; as a Hugging Face "
                                f"Hub id: {type(err).__name__}: {err})") from err
    return Path(fetched)


def _check_format(config: dict, config_path: Path) -> None:
    if config.get("format") != FORMAT_NAME:
        raise ValueError(f"{config_path}: format is {config.get('format')!r}, expected {FORMAT_NAME!r} "
                         "(or model_type 'nearid' for a released NearID checkpoint)")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format_version {config.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    for field in ("backbone", "head"):
        if field not in config:
            raise ValueError(f"{config_path}: missing field {field!r}")


def _backbone_from_config(backbone_cfg: dict) -> Backbone:
    """Rebuild a backbone architecture from its saved config; weights are loaded afterwards."""
    kind = backbone_cfg["kind"]
    if kind not in KIND_CLASSES:
        raise ValueError(f"backbone kind {kind!r} is not one of {sorted(KIND_CLASSES)}")
    model_cls, config_cls = KIND_CLASSES[kind]
    hf_config = config_cls.from_dict(backbone_cfg["hf_config"])
    model = model_cls(hf_config)
    processor = processor_from_spec(backbone_cfg["image_processor"])
    return Backbone(
        model, kind, processor, name=backbone_cfg["name"], reloadable=False,
        tiny_overrides=backbone_cfg.get("tiny_overrides"), seed=backbone_cfg.get("seed"),
    )


def model_card(config: dict, metrics: dict | None = None) -> str:
    """Markdown model card: what the model is, its backbone, metrics and how to load it."""
    backbone = config["backbone"]
    head = config["head"]
    lines = [
        "---",
        "library_name: nearid",
        "tags: [image-feature-extraction, identity-embedding, nearid]",
        "---",
        "",
        "# NearID identity embedding model",
        "",
        "Identity-aware image embeddings: a frozen vision backbone followed by a retrained",
        "multihead attention pooling (MAP) head. Embeddings are L2-normalised; compare images",
        "with cosine similarity. Trained to rank a true other view of the same object above a",
        "near-identity distractor (a look-alike object in the exact same background).",
        "",
        "## Backbone",
        "",
        f"- name: `{backbone['name']}` ({backbone['kind']})",
        f"- input: {backbone['image_size']}x{backbone['image_size']} px, {backbone['num_tokens']} tokens of "
        f"{backbone['hidden_size']} dims",
        f"- weights stored in this repo: {'yes' if backbone['weights_included'] else 'no (rebuilt from the name)'}",
        f"- head: {head['num_heads']} heads, hidden {head['hidden_size']}, MLP {head['intermediate_size']} "
        f"({head['hidden_act']})",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        for key, value in metrics.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    lines += [
        "## Usage",
        "",
        "```python",
        "from PIL import Image",
        "from nearid.model import NearIDModel",
        "",
        'model = NearIDModel.from_pretrained("path/to/this/dir")  # or an s3:// path',
        'sims = model.score([Image.open("ref.png")], [Image.open("gen.png")])',
        "```",
        "",
        "Weights are in safetensors; loading never unpickles and never runs remote code.",
        "",
    ]
    return "\n".join(lines)


def open_image(path: str) -> Image.Image:
    """An image file (local or fsspec URL); errors name the path, not a file object."""
    from .images import BadImage, decode_image

    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, IsADirectoryError) as e:
        raise BadImage(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return decode_image(data, what=str(path))


def score_pairs(
    model: NearIDModel, pairs: Iterable[tuple[str, str]], batch_size: int = 32
) -> list[float]:
    """Cosine similarity for each (reference path, generated path) pair.

    Paths may be local or any fsspec URL. Each distinct image is embedded once, so many
    generations against one reference cost one reference embedding.
    """
    pairs = list(pairs)
    unique_paths = list(dict.fromkeys(path for pair in pairs for path in pair))
    index = {path: i for i, path in enumerate(unique_paths)}
    embeddings = []
    for start in range(0, len(unique_paths), batch_size):
        images = [open_image(str(p)) for p in unique_paths[start:start + batch_size]]
        embeddings.append(model.embed(images, batch_size=batch_size))
    if not embeddings:
        return []
    table = torch.cat(embeddings)
    refs = table[[index[ref] for ref, _ in pairs]]
    gens = table[[index[gen] for _, gen in pairs]]
    return (refs * gens).sum(dim=-1).tolist()


def initial_head(backbone, head_seed: int = 0) -> MAPHead:
    """The head training starts from: the backbone's pretrained MAP head (SigLIP), else a fresh
    head shaped from its config and seeded by `head_seed` (CLIP, DINOv2), in float32."""
    if backbone.has_map_head:
        return MAPHead.from_backbone(backbone)
    config = backbone.model.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed)
        return MAPHead.from_config(
            hidden_size=backbone.hidden_size,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            layer_norm_eps=config.layer_norm_eps,
            hidden_act=config.hidden_act,
        )
