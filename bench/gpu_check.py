"""One-shot GPU check: what this project does on one H100/H200, in under 8 minutes, no downloads.

    .venv/bin/python -m bench.gpu_check                 # on a machine with one NVIDIA GPU
    .venv/bin/python -m bench.gpu_check --smoke         # tiny dims on CPU: checks the script runs

Random weights at the real dims (SigLIP2 so400m@384: 27 layers, 1152 wide, 729 tokens; an
SDXL-size inpainting UNet). Measures, side by side in one run:
  1. extraction img/s and MFU (670 GFLOPs per image) in bf16 at batch 64/128/256, eager vs
     torch.compile;
  2. the Ray Data extraction job vs a bare loop on the same GPU and batch;
  3. one training step on cached tokens vs the backbone in the loop (batch 128 items x 6 images);
  4. an SDXL-size inpainting UNet step, batch 8 vs 8 steps of batch 1;
  5. the whole pipeline at small scale with `cuda` everywhere.
Prints one Markdown table and writes bench/results/gpu_check.json, which `nearid plan` reads.
Every section is timed on its own and a failing section is reported, not fatal.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "gpu_check.json"
SO400M_GFLOPS = 670.0
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops() -> float:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), float("nan"))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call after warm-up (compiles and caches happen in the warm-up)."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def backbone(smoke: bool, device: str):
    from nearid.backbones.dispatch import load_backbone

    bb = load_backbone("tiny-random" if smoke else "so400m-random", device=device,
                       dtype=torch.float32 if smoke else torch.bfloat16)
    return bb


def check_extraction(args, device, res):
    bb = backbone(args.smoke, device)
    size = bb.image_size
    for batch in ([8] if args.smoke else [64, 128, 256]):
        pix = torch.randn(batch, 3, size, size, device=device, dtype=bb.dtype)
        eager = timed(lambda: bb.tokens(pix))
        res[f"extract_eager_b{batch}_img_s"] = batch / eager
        try:
            model = torch.compile(bb.model)
            with torch.no_grad():
                comp = timed(lambda: model(pixel_values=pix).last_hidden_state, warmup=3)
            res[f"extract_compiled_b{batch}_img_s"] = batch / comp
        except Exception as e:  # noqa: BLE001 - report and go on
            res[f"extract_compiled_b{batch}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res[f"extract_eager_b{batch}_mfu"] = batch / eager * SO400M_GFLOPS / 1e3 / peak_tflops()
    best = max(v for k, v in res.items() if k.startswith("extract_") and k.endswith("_img_s"))
    res["extract_img_s"] = best


def check_ray_vs_bare(args, device, res):
    import ray

    from bench.bench_extract import bare_loop, ray_job, write_world_positives   # as the CPU bench
    from nearid.config import load_config

    n = 96 if args.smoke else 3072
    root = tempfile.mkdtemp(prefix="gpu-check-")
    backbone_name = "tiny-random" if args.smoke else "so400m-random"
    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"run.root={root}", f"synth.n_identities={n // 3}", f"extract.backbone.name={backbone_name}",
        f"extract.backbone.dtype={'fp32' if args.smoke else 'bf16'}",
        f"extract.gpus_per_actor={1 if device == 'cuda' else 0}", f"synth.resolution={64 if args.smoke else 384}"])
    images = write_world_positives(cfg, root)
    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):   # a running runtime (a test session's)
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    elif not ray.is_initialized():   # logical CPUs >= 4 so the Decode and Embed actors never starve
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
    batch = 8 if args.smoke else 128
    if not args.smoke:   # a steady-state rate on the GPU; the smoke run only checks that it runs
        ray_job(cfg, root, 1, batch)                 # warm-up
    res["raydata_extract_img_s"] = ray_job(cfg, root, 1, batch)
    res["bare_extract_img_s"] = bare_loop(cfg, images, batch)
    res["raydata_over_bare"] = res["raydata_extract_img_s"] / res["bare_extract_img_s"]
    shutil.rmtree(root, ignore_errors=True)


def check_train_step(args, device, res):
    from nearid.head import MAPHead
    from nearid.losses import build_loss

    bb = backbone(args.smoke, device)
    head = MAPHead.from_backbone(bb).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    loss_fn = build_loss("nearid")
    b, m = (4, 6) if args.smoke else (128, 6)
    tokens = torch.randn(b, m, bb.num_tokens, bb.hidden_size, device=device)
    pix = torch.randn(b * m, 3, bb.image_size, bb.image_size, device=device, dtype=bb.dtype)

    def step(tok):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            emb = head(tok.reshape(b * m, *tok.shape[2:])).float().reshape(b, m, -1)
        out = loss_fn(emb[:, 0], emb[:, 1:3], emb[:, 3:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    res["train_step_s_cached"] = timed(lambda: step(tokens), iters=3)
    chunk = 32 if not args.smoke else 8
    res["train_step_s_images"] = timed(lambda: step(torch.cat(
        [bb.tokens(pix[i:i + chunk]) for i in range(0, b * m, chunk)]).float().reshape(b, m, bb.num_tokens, -1)),
        warmup=1, iters=2)
    res["train_in_loop_over_cached"] = res["train_step_s_images"] / res["train_step_s_cached"]


def check_unet(args, device, res):
    from diffusers import UNet2DConditionModel

    if args.smoke:
        unet = UNet2DConditionModel(sample_size=16, in_channels=9, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
        latent, ctx_dim, tokens, added = 16, 32, 8, None
    else:   # SDXL inpainting dims (2.6B parameters), random weights
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=9, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        latent, ctx_dim, tokens, added = 128, 2048, 77, True
    dtype = torch.float32 if args.smoke else torch.float16
    unet = unet.to(device, dtype).eval()

    def run(batch):
        x = torch.randn(batch, 9, latent, latent, device=device, dtype=dtype)
        ctx = torch.randn(batch, tokens, ctx_dim, device=device, dtype=dtype)
        kw = {}
        if added:
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
                                       "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)}
        with torch.no_grad():
            unet(x, torch.tensor([500] * batch, device=device), ctx, **kw)
    one = timed(lambda: run(1), iters=3)
    eight = timed(lambda: run(8), iters=3)
    res["unet_step_s_b1"], res["unet_step_s_b8"] = one, eight
    res["unet_batch8_speedup"] = 8 * one / eight
    # a 30-step 1024 px inpainting at batch 8 -> seconds per image, what `nearid plan` uses
    res.setdefault("generate_s_per_image", {})["sdxl_inpaint"] = 30 * eight / 8 * (512 / 1024) ** 2


def check_pipeline(args, device, res):
    import subprocess

    root = tempfile.mkdtemp(prefix="gpu-check-pipeline-")
    sets = ["--set", f"run.root={root}", "--set", "synth.n_identities=60", "--set", "train.epochs=2",
            "--set", "eval.plots=false"]
    if args.smoke:   # every stage still runs, on less: one setting, a handful of MTG and DB++ rows
        sets += ["--set", "synth.n_identities=24", "--set", "synth.n_mtg=8", "--set", "synth.n_graded=6",
                 "--set", "generate.settings={flux: {backend: procedural, n_changes: 1}}", "--set", "train.epochs=1",
                 "--set", "train.batch_size=8"]
    if device == "cuda":
        sets += ["--set", "train.use_gpu=true", "--set", "extract.gpus_per_actor=1",
                 "--set", "generate.gpus_per_actor=0"]
    env = dict(os.environ)
    import ray

    if ray.is_initialized():   # attach to the runtime ray_vs_bare started, as `ray job submit` would
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "configs/tiny.yaml", *sets],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    res["pipeline_small_s"] = time.perf_counter() - t
    res["pipeline_small_rc"] = p.returncode
    if p.returncode:
        res["pipeline_small_tail"] = p.stdout[-1500:] + p.stderr[-1500:]
    shutil.rmtree(root, ignore_errors=True)


SECTIONS = {"extraction": check_extraction, "ray_vs_bare": check_ray_vs_bare, "train_step": check_train_step,
            "unet": check_unet, "pipeline": check_pipeline}


def table(res: dict) -> str:
    rows = ["| measurement | value |", "|---|---|"]
    for k, v in res.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict):
            v = json.dumps({a: round(b, 4) for a, b in v.items()})
        rows.append(f"| {k} | {v} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny dims, CPU allowed: check the script itself")
    p.add_argument("--only", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("error: no CUDA device; run with --smoke to check the script on CPU", file=sys.stderr)
        return 2
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "smoke": args.smoke,
                 "torch": torch.__version__}
    for name in args.only:
        t = time.perf_counter()
        try:
            SECTIONS[name](args, device, res)
        except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
            res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        res[f"{name}_section_s"] = time.perf_counter() - t
        print(f"{name}: {res[f'{name}_section_s']:.1f}s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    print(table(res))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
