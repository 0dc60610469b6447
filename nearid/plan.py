"""`nearid plan --config FILE`: what a run costs before it starts.

Counts images per stage from the config (or the run root's tables when they exist), the token
cache from the backbone's token shape, and GPU-hours from per-image / per-step costs: measured
ones where `bench/gpu_check.py` wrote `bench/results/gpu_check.json`, else the stated estimates
below (each printed with where it came from). From `bench/results/scale.json` (`python -m
bench.scale`): the extraction pipeline's CPU seconds per image (decode, Ray Data, Parquet write,
measured with the tiny backbone at 32 px as the marginal cost between its two largest sizes: a
floor, larger images decode slower), the Parquet
bytes per token value and per row besides the tokens (the token cache), and the training items
per train identity (items per epoch).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURED = REPO / "bench" / "results" / "gpu_check.json"
SCALE = REPO / "bench" / "results" / "scale.json"
# Stated estimates for one H100/H200-class GPU (seconds per image per GPU unless noted). Generation:
# diffusers inpainting at the setting's resolution and step count; extraction: so400m@384 in bf16
# at ~700 img/s (670 GFLOPs/image at ~45 % MFU); training: one step of batch 128 on cached tokens.
GENERATE_S_PER_IMAGE = {"flux_fill": 1.6, "flux_canny": 1.6, "sdxl_inpaint": 0.45, "sd_inpaint": 0.12,
                        "qwen_edit": 2.5, "auto": 1.0, "procedural": 0.0}
EXTRACT_IMG_S = 700.0
TRAIN_STEP_S_CACHED = 0.25
TRAIN_STEP_S_IMAGES = 1.9      # backbone in the loop: 128 items x 6 images through so400m
REFERENCE_RES = 512            # generation cost scales with pixels relative to this


@dataclass
class Line:
    stage: str
    images: int
    gpu_hours: float
    source: str
    cpu_hours: float = 0.0


def _read(env: str, default: Path) -> dict:
    try:
        return json.loads(Path(os.environ.get(env, default)).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _measured() -> dict:
    return _read("NEARID_GPU_CHECK", MEASURED)


def scale_figures() -> dict:
    """The figures plan takes from bench.scale's JSON (NEARID_SCALE or bench/results/scale.json);
    {} when it has not been run."""
    raw = _read("NEARID_SCALE", SCALE)
    try:
        largest, r = raw["sizes"][-1], raw["ratios"]
        return {"cpu_s_per_image": r["marginal_extract_s_per_image"] * largest["cpus"],
                "token_bytes_per_value": largest["token_bytes_per_value"],
                "other_bytes_per_row": largest["other_bytes_per_row"],
                "items_per_train_identity": largest["items_per_train_identity"],
                "rows": largest["rows"], "cpus": largest["cpus"], "measured": largest["measured"]}
    except (KeyError, IndexError, TypeError):
        return {}


def _token_shape(cfg) -> tuple[int, int]:
    """From the name when it is a hub id of a known family (planning happens before the weights
    are downloaded), else from the backbone's config and processor."""
    from .backbones.dispatch import known_token_shape
    from .stages.extract import token_shape

    return known_token_shape(cfg.extract.backbone.name) or token_shape(cfg.extract)


def plan(cfg, usd_per_gpu_hour: float | None = None, storage=None) -> dict:
    pc = cfg.plan
    usd_per_gpu_hour = pc.usd_per_gpu_hour if usd_per_gpu_hour is None else usd_per_gpu_hour
    n_ids = (storage.read_table("positives", columns=["id"]).num_rows // cfg.synth.n_views
             if storage is not None and storage.table_exists("positives") else None) \
        or pc.identities or cfg.synth.n_identities
    n_mtg = cfg.synth.n_mtg if pc.mtg_samples is None else pc.mtg_samples
    train_share = pc.train_share or cfg.synth.split.get("train", 0.8)
    views = n_ids * cfg.synth.n_views
    meas = _measured()
    lines: list[Line] = []
    for name, s in cfg.generate.settings.items():
        res = s.resolution or cfg.synth.resolution
        base = meas.get("generate_s_per_image", {}).get(s.backend)
        src = "measured (gpu_check)" if base is not None else "estimate"
        per = (base if base is not None else GENERATE_S_PER_IMAGE.get(s.backend, 1.0)) * (res / REFERENCE_RES) ** 2
        if s.backend != "procedural":
            steps = s.params.get("steps")
            if steps:
                per *= steps / 30
        lines.append(Line(f"generate {name} ({s.backend}, {res}px)", views, views * per / 3600, src))
    n_settings = len(cfg.generate.settings)
    n_extract = views * (1 + n_settings) + 4 * n_mtg
    img_s = meas.get("extract_img_s") or EXTRACT_IMG_S
    lines.append(Line("extract (frozen backbone)", n_extract, n_extract / img_s / 3600,
                      "measured (gpu_check)" if meas.get("extract_img_s") else "estimate"))
    sc = scale_figures()
    scale_src = f"measured (bench.scale, {sc['rows']:,} rows)" if sc else ""
    if sc:
        lines.append(Line("extract, CPU side (decode, Ray Data, Parquet write)", n_extract, 0.0, scale_src,
                          cpu_hours=n_extract * sc["cpu_s_per_image"] / 3600))
    tc = cfg.train
    n_train = int(n_ids * train_share * sc.get("items_per_train_identity", 1.0)) + tc.mtg_repeat * n_mtg
    steps = max(1, n_train // tc.batch_size) * tc.epochs
    key = "train_step_s_images" if tc.input_mode == "images" else "train_step_s_cached"
    step_s = meas.get(key) or (TRAIN_STEP_S_IMAGES if tc.input_mode == "images" else TRAIN_STEP_S_CACHED)
    step_src = "measured (gpu_check)" if meas.get(key) else "estimate"
    lines.append(Line(f"train ({steps} steps, {tc.input_mode})", n_train, steps * step_s / 3600,
                      step_src + (f"; items per epoch: {scale_src}" if sc else "")))
    lines.append(Line(f"tune ({cfg.tune.num_samples} trials, <= full budget each)", n_train,
                      cfg.tune.num_samples * steps * step_s / 3600 * (cfg.tune.epochs or tc.epochs) / tc.epochs,
                      step_src))
    T, D = _token_shape(cfg)
    bytes_per_row = (T * D * sc["token_bytes_per_value"] + sc["other_bytes_per_row"]) if sc else T * D * 2
    cache = int(n_extract * bytes_per_row) if cfg.extract.write_tokens else 0
    image_bytes = (views * (1 + n_settings)) * 60_000       # ~60 KB per encoded image
    gpu_h = sum(line.gpu_hours for line in lines)
    return {"identities": n_ids, "lines": lines, "token_cache_bytes": cache, "image_bytes": image_bytes,
            "cache_source": scale_src or "estimate (2 bytes per fp16 value)", "scale": sc,
            "cpu_hours": sum(line.cpu_hours for line in lines),
            "cores_per_gpu": img_s * sc["cpu_s_per_image"] if sc else None,
            "token_shape": (T, D), "gpu_hours": gpu_h, "usd": gpu_h * usd_per_gpu_hour,
            "usd_per_gpu_hour": usd_per_gpu_hour}


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def format_plan(p: dict) -> str:
    rows = ["| stage | images | GPU-hours | CPU-hours | cost basis |", "|---|---|---|---|---|"]
    for line in p["lines"]:
        rows.append(f"| {line.stage} | {line.images:,} | {line.gpu_hours:,.2f} | {line.cpu_hours:,.2f} "
                    f"| {line.source} |")
    T, D = p["token_shape"]
    rows += ["", f"identities: {p['identities']:,}",
             f"token cache: {_gb(p['token_cache_bytes'])} ({T} x {D} fp16 per image; bytes: {p['cache_source']})",
             f"images (encoded, estimate): {_gb(p['image_bytes'])}",
             f"total: {p['gpu_hours']:,.1f} GPU-hours = ${p['usd']:,.0f} at ${p['usd_per_gpu_hour']:.2f}/GPU-hour"
             f" (wall time divides by the GPUs you run on)"]
    if p["cores_per_gpu"] is not None:
        rows.append(f"CPU: {p['cpu_hours']:,.1f} CPU-hours; at least {math.ceil(p['cores_per_gpu'])} CPU cores per GPU "
                    f"keep extraction fed ({1000 * p['scale']['cpu_s_per_image']:.2f} CPU-ms per image in bench.scale: "
                    "Ray Data, Parquet and 32-px decoding, a floor; larger images decode slower)")
    if not math.isfinite(p["gpu_hours"]):
        rows.append("warning: a cost is not finite")
    return "\n".join(rows)
