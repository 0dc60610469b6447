"""A model's scoring protocol: what another pipeline must match to get the same scores.

`save_pretrained` writes it as `protocol.json` beside `config.json`; `from_pretrained` derives the
same record from what it actually loaded (config, image processor, stored weights) and refuses a
dir whose `protocol.json` disagrees, naming the field. Dirs without one (the released checkpoint,
dirs written before protocol.json existed) still load; their protocol is the derived one.

    {"protocol_version": 1,
     "backbone": {"id", "kind", "revision", "weights", ["seed"]},  # revision: hub commit, wheel sha256, or null
     "resolution": 384,                                            # square pixel size the backbone sees
     "preprocessing": {"processor", "convert_rgb", "resize": {"size", "resample"} | null,
                       "center_crop": {"height", "width"} | null, "rescale_factor" | null,
                       "normalize": {"mean": [r, g, b], "std": [r, g, b]} | null},
     "dtype": "float16",                  # the stored weights (scoring loads them as float32)
     "readout": "map_head", "tokens": 729, "embedding_dim": 1152,
     "normalize": true, "similarity": "cosine", "score_range": [-1.0, 1.0]}

`backbone.revision` is compared only where both sides know it (a hub snapshot read offline has
no commit hash), every other field always.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PROTOCOL_FILE = "protocol.json"
PROTOCOL_VERSION = 1
READOUT = "map_head"   # NearID's MAP attention-pooling head over the backbone's final-layer tokens


class ProtocolMismatch(ValueError):
    """protocol.json disagrees with the model that loads; the message names the file and field."""


def _resample_name(value) -> str | None:
    if value is None:
        return None
    from PIL import Image

    try:
        return Image.Resampling(int(value)).name.lower()
    except ValueError:
        return str(value)


def _floats(xs) -> list[float]:
    return [float(x) for x in (xs if isinstance(xs, (list, tuple)) else [xs] * 3)]


def preprocessing(backbone) -> dict[str, Any]:
    """The image processor's settings as plain JSON (resize, crop, rescale, mean/std)."""
    spec = backbone.processor_spec()
    st = spec["settings"]
    crop = st.get("crop_size") if st.get("do_center_crop") else None
    return {
        "processor": spec["class"],
        "convert_rgb": True,                       # Backbone.preprocess converts every image to RGB
        "resize": {"size": dict(st.get("size") or {}), "resample": _resample_name(st.get("resample"))}
        if st.get("do_resize", True) else None,
        "center_crop": dict(crop) if crop else None,
        "rescale_factor": float(st.get("rescale_factor", 1 / 255)) if st.get("do_rescale", True) else None,
        "normalize": {"mean": _floats(st.get("image_mean")), "std": _floats(st.get("image_std"))}
        if st.get("do_normalize", True) else None,
    }


def backbone_revision(backbone) -> str | None:
    """The backbone's revision where it is known: the hub commit of its snapshot, or for the
    wheel-converted DINOv2-S the pinned wheel's sha256; None otherwise (random, local dirs)."""
    commit = getattr(backbone.model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    from .backbones.dispatch import name_revision

    return name_revision(backbone.name, backbone.kind)


def model_protocol(model, dtype=None, weights_included: bool | None = None) -> dict:
    """The protocol record of `model`. `dtype`: the stored weights' dtype (default: the head's);
    `weights_included`: whether the backbone weights are in the model dir (default: when the
    backbone cannot be rebuilt from its name). `from_pretrained` sets `model.protocol` (and
    `model.protocol_source`) to the record of the dir it loaded."""
    b = model.backbone
    dtype = dtype or model.head.probe.dtype
    included = (not b.reloadable) if weights_included is None else bool(weights_included)
    backbone = {"id": b.name, "kind": b.kind, "revision": backbone_revision(b),
                "weights": "in model dir" if included else "by id"}
    if b.seed is not None and not included:
        backbone["seed"] = b.seed
    return {
        "protocol_version": PROTOCOL_VERSION,
        "backbone": backbone,
        "resolution": b.image_size,
        "preprocessing": preprocessing(b),
        "dtype": str(dtype).removeprefix("torch."),      # torch.float16 -> "float16"
        "readout": READOUT,
        "tokens": b.num_tokens,
        "embedding_dim": model.embedding_dim,
        "normalize": True,
        "similarity": "cosine",
        "score_range": [-1.0, 1.0],
    }


def write_protocol(directory: str | Path, protocol: dict) -> Path:
    path = Path(directory) / PROTOCOL_FILE
    path.write_text(json.dumps(protocol, indent=2, sort_keys=True) + "\n")
    return path


def read_protocol(directory: str | Path) -> dict | None:
    """protocol.json of a model dir, or None where it has none."""
    path = Path(directory) / PROTOCOL_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ProtocolMismatch(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ProtocolMismatch(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("protocol_version") != PROTOCOL_VERSION:
        raise ProtocolMismatch(f"{path}: field protocol_version is {data.get('protocol_version')!r}, "
                               f"expected {PROTOCOL_VERSION}")
    return data


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _first_difference(saved, loaded, field: str = ""):
    """(field, saved value, loaded value) of the first disagreement, or None."""
    if isinstance(saved, dict) and isinstance(loaded, dict):
        for key in sorted(set(saved) | set(loaded)):
            sub = f"{field}.{key}" if field else key
            if sub == "backbone.revision" and (saved.get(key) is None or loaded.get(key) is None):
                continue
            if key not in saved or key not in loaded:
                return sub, saved.get(key, "<absent>"), loaded.get(key, "<absent>")
            diff = _first_difference(saved[key], loaded[key], sub)
            if diff:
                return diff
        return None
    if isinstance(saved, list) and isinstance(loaded, list):
        if len(saved) != len(loaded) or any(_first_difference(a, b) for a, b in zip(saved, loaded)):
            return field, saved, loaded   # the whole list: "mean [0.5, 0.5, 0.5]" reads better
        return None
    return None if _same(saved, loaded) else (field, saved, loaded)


def check_protocol(saved: dict, loaded: dict, path: str | Path) -> None:
    """ProtocolMismatch naming `path` and the first field where `saved` (protocol.json) and
    `loaded` (derived from the config, processor and weights that loaded) disagree."""
    diff = _first_difference(saved, loaded)
    if diff:
        field, want, got = diff
        raise ProtocolMismatch(f"{path}: field {field} is {json.dumps(want)} but the model loads with "
                               f"{json.dumps(got)} (from config.json, its image processor and weights); "
                               "the dir was changed after it was saved")


def _rescale(factor: float) -> str:
    return "1/255 (pixels to [0, 1])" if math.isclose(factor, 1 / 255) else f"{factor:.10g}"


def format_protocol(protocol: dict, source: str | None = None) -> str:
    """The protocol as `field: value` lines, for `nearid score --protocol`."""
    b, pre = protocol["backbone"], protocol["preprocessing"]
    resize = pre.get("resize")
    crop = pre.get("center_crop")
    norm = pre.get("normalize")
    size = ", ".join(f"{k} {v}" for k, v in (resize or {}).get("size", {}).items())
    lines = [
        f"backbone:      {b['id']} ({b['kind']}; weights {b['weights']}"
        + (f"; seed {b['seed']}" if "seed" in b else "") + ")",
        f"revision:      {b.get('revision') or 'unknown'}",
        f"resolution:    {protocol['resolution']}x{protocol['resolution']} px, {protocol['tokens']} tokens",
        f"resize:        {size} ({resize['resample']})" if resize else "resize:        none",
        f"crop:          center {crop['height']}x{crop['width']}" if crop else "crop:          none",
        f"rescale:       {_rescale(pre['rescale_factor'])}" if pre.get("rescale_factor") else "rescale:       none",
        f"normalise:     mean {norm['mean']} std {norm['std']}" if norm else "normalise:     none",
        f"dtype:         {protocol['dtype']} (stored weights; nearid score computes in float32)",
        f"readout:       {protocol['readout']} (NearID MAP head over the final-layer tokens), "
        f"L2-normalised",
        f"embedding dim: {protocol['embedding_dim']}",
        f"score:         {protocol['similarity']} in [{protocol['score_range'][0]:g}, {protocol['score_range'][1]:g}]",
    ]
    if source:
        lines.append(f"source:        {source}")
    return "\n".join(lines)
