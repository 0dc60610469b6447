"""In-process study of the synthetic NearID world: render -> distractors -> frozen tokens -> trained
MAP head -> held-out SSR/PA, with a CLI flag for every lever (docs/world_study.md). No Ray, no storage.

    python -m bench.world_study [--n-identities 600] [--resolution 64] [--patch 4] [--layers 0] ...

It mirrors the production path so that findings transfer: positives from `SynthWorld`, the
distractors of the default settings (flux: 1 change, sdxl: 2, powerpaint: 1) from the procedural
backend fed by `near_identity_prompt` and composited with a 2-px dilated mask, seeded per
(run seed, id, view, setting) like `stages.generate`; the head is trained on cached tokens with the
same per-epoch draw (`training.items.draw_batch`) and loss as `training.loop`, through the same
fitting core (`training.fit`: AdamW, cosine warm-up, the train step with its grad clip), so its
numbers come from the production step. Prints one table: frozen map / mean readouts and the
trained head, SSR/PA on the test and train splits, plus the trained head's win rate per changed
attribute.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from nearid import numerics
from nearid.backbones.dispatch import load_backbone
from nearid.generate.masks import composite, dilate_mask
from nearid.generate.procedural import ProceduralBackend
from nearid.generate.prompts import near_identity_prompt
from nearid.head import MAPHead
from nearid.model import initial_head
from nearid.backbones.dinov2_small import mean_pool_head_init_
from nearid.losses import build_loss
from nearid.metrics import nearid_scores
from nearid.stages.generate import row_seed
from nearid.synth import SynthWorld
from nearid.synth.grammar import describe, parse
from nearid.synth.variation import changed_attributes
from nearid.synth.visibility import visible_near_identity
from nearid.training import fit
from nearid.training.items import N_VIEWS, draw_batch
from nearid.training.validate import item_sims

DEFAULT_SETTINGS = (("flux", 1), ("sdxl", 2), ("powerpaint", 1))
CACHE_DIR = Path("/tmp/nearid_world_cache")
EXTRACT_THREADS = 2   # tokens depend on the thread count: cached tokens are always made with this many
N_POSITIVES, N_DISTRACTORS = 2, 3   # slots drawn per item: the production defaults (train config)


@dataclass
class WorldConfig:
    """What is rendered: the world and its distractors."""

    seed: int = 0
    n_identities: int = 600
    resolution: int = 64
    split: tuple[float, float, float] = (0.8, 0.05, 0.15)
    closeness: float = 1.0
    settings: tuple[tuple[str, int], ...] = DEFAULT_SETTINGS
    dilation: int = 2
    distractors: str = "procedural"  # or "oracle" (SynthWorld.render_distractor)
    run_seed: int = 0
    backgrounds: str = "procedural"  # or "photo" (nearid.synth.photos)
    area_range: tuple[float, float] = (0.15, 0.32)
    min_visible_share: float = 0.0   # re-draw look-alikes whose change is less visible (synth.visibility)
    lookalike_attributes: tuple[str, ...] | None = None   # None: all five may change

    def key(self) -> str:
        fields_ = asdict(self)
        if fields_["lookalike_attributes"] is None:   # keys of worlds rendered before the field existed
            fields_.pop("lookalike_attributes")
        blob = json.dumps(fields_, sort_keys=True) + _world_fingerprint()
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


@dataclass
class ModelConfig:
    """The frozen backbone (tiny SigLIP from tiny_overrides, or a named one such as
    dinov2-small@112) and the head training recipe."""

    backbone: str = "tiny-random"
    head_init: str = "backbone"   # the production start (nearid.model.initial_head), or "mean"
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    token_mixing: bool = True
    backbone_seed: int = 0
    loss: str = "nearid"
    temperature: float = 0.07
    alpha: float = 0.5
    use_negatives: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0
    token_dropout: float = 0.0
    epochs: int = 8
    batch_size: int = 64
    train_seed: int = 0
    threads: int = 2

    def tiny_overrides(self) -> dict:
        return dict(image_size=self.image_size, patch_size=self.patch_size,
                    hidden_size=self.hidden_size, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, intermediate_size=self.intermediate,
                    token_mixing=self.token_mixing)

    def loss_params(self) -> dict:
        if self.loss == "nearid":
            return dict(temperature=self.temperature, alpha=self.alpha)
        if self.loss == "infonce":
            return dict(temperature=self.temperature, use_negatives=self.use_negatives)
        return {}


@dataclass
class WorldData:
    """Rendered images [n, S, V, H, W, 3] (source 0 = positive), ids, splits, and per
    distractor the attributes that changed (n x settings x views lists)."""

    ids: list[str]
    splits: np.ndarray
    images: np.ndarray
    settings: list[str]
    changed: list = field(default_factory=list)
    render_seconds: float = 0.0
    redrawn: float = 0.0   # share of look-alikes re-drawn for visibility

    @property
    def sources(self) -> list[str]:
        return ["positive", *self.settings]


def _world_fingerprint() -> str:
    """Hash of the world's source files, so a cached render is redone when the world changes."""
    root = Path(__file__).resolve().parent.parent / "nearid"
    files = sorted((root / "synth").glob("*.py")) + [root / "generate" / "procedural.py",
                                                     root / "generate" / "prompts.py"]
    return hashlib.blake2b(b"".join(f.read_bytes() for f in files), digest_size=8).hexdigest()


def render_world(wc: WorldConfig, use_cache: bool = True) -> WorldData:
    """Positives and distractors of every identity, as the pipeline would produce them."""
    path = CACHE_DIR / f"{wc.key()}.npz"
    if use_cache and path.exists():
        z = np.load(path, allow_pickle=True)
        return WorldData(list(z["ids"]), z["splits"], z["images"], list(z["settings"]),
                         list(z["changed"]), float(z["render_seconds"]), float(z["redrawn"]))
    t0 = time.perf_counter()
    world = SynthWorld(seed=wc.seed, n_identities=wc.n_identities, n_views=N_VIEWS,
                       resolution=wc.resolution, split_sizes=wc.split, closeness=wc.closeness,
                       area_range=wc.area_range, backgrounds=wc.backgrounds)
    backend = ProceduralBackend()
    ids = world.ids()
    settings = [name for name, _ in wc.settings]
    res = wc.resolution
    images = np.zeros((len(ids), 1 + len(settings), N_VIEWS, res, res, 3), np.uint8)
    changed = []
    vis = ({"visible_at": res, "area": sum(wc.area_range) / 2.0, "min_share": wc.min_visible_share}
           if wc.min_visible_share else {})
    redrawn = 0
    for i, id_ in enumerate(ids):
        spec = world.identity(id_)
        description = describe(spec)
        per_setting = [[None] * N_VIEWS for _ in settings]
        for v in range(N_VIEWS):
            img, mask = world.render_view(id_, v)
            images[i, 0, v] = np.asarray(img)
            dilated = dilate_mask(mask, wc.dilation)
            for s, (name, n_changes) in enumerate(wc.settings):
                seed = row_seed(wc.run_seed, id_, v, name)
                if wc.distractors == "oracle":
                    variant = world.near_identity(spec, seed, n_changes=n_changes)
                    out, _ = world.render_distractor(id_, v, variant)
                else:
                    prompt = near_identity_prompt(spec.category, description, seed=seed,
                                                  n_changes=n_changes, closeness=wc.closeness,
                                                  attributes=wc.lookalike_attributes, **vis)
                    if vis:
                        redrawn += visible_near_identity(spec, seed, n_changes=n_changes, closeness=wc.closeness,
                                                         res=res, area=vis["area"], min_share=vis["min_share"],
                                                         attributes=wc.lookalike_attributes)[1] > 0
                    variant = parse(prompt)
                    gen = backend.inpaint([img], [dilated], [prompt], [seed])[0]
                    out = composite(img, gen, dilated)
                images[i, 1 + s, v] = np.asarray(out)
                per_setting[s][v] = changed_attributes(spec, variant)
        changed.append(per_setting)
    splits = np.array([world.split_of(i) for i in ids])
    data = WorldData(ids, splits, images, settings, changed, time.perf_counter() - t0,
                     redrawn / float(len(ids) * N_VIEWS * len(settings)))
    if use_cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        np.savez(path, ids=np.array(ids), splits=splits, images=images, settings=np.array(settings),
                 changed=np.array(changed, dtype=object), render_seconds=data.render_seconds,
                 redrawn=data.redrawn)
    return data


def _backbone(mc: ModelConfig):
    if mc.backbone == "tiny-random":
        return load_backbone("tiny-random", tiny_overrides=mc.tiny_overrides(), seed=mc.backbone_seed)
    return load_backbone(mc.backbone)


@torch.no_grad()
def extract(data: WorldData, mc: ModelConfig, batch: int = 64, cache_key: str | None = None):
    """Frozen tokens [n, S*V, T, D] (fp16) and the backbone's frozen readouts (map / mean / cls,
    as it has them): [n, S*V, D] (unit). A named backbone's tokens are cached under CACHE_DIR."""
    backbone = _backbone(mc)
    tag = f"{cache_key}-{mc.backbone}-{numerics.describe()}"
    tag = hashlib.blake2b(tag.encode(), digest_size=8).hexdigest()
    path = CACHE_DIR / f"tokens-{tag}.pt" if cache_key and mc.backbone != "tiny-random" else None
    if path is not None and path.exists():
        saved = torch.load(path)
        return backbone, saved["tokens"], {k: v.numpy() for k, v in saved["readouts"].items()}
    from PIL import Image

    n, S, V = data.images.shape[:3]
    flat = data.images.reshape(n * S * V, *data.images.shape[3:])
    toks, reads = [], {}
    same_size = flat.shape[1] == backbone.image_size and backbone.kind == "siglip"
    with numerics.fixed_threads(EXTRACT_THREADS):
        for s in range(0, flat.shape[0], batch):
            if same_size:  # the processor's resize is a no-op here: rescale + normalise directly
                pix = torch.from_numpy(flat[s:s + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            else:
                pix = backbone.preprocess([Image.fromarray(a) for a in flat[s:s + batch]])
            t = backbone.tokens(pix).float()
            for k, r in backbone.readouts(tokens=t).items():
                reads.setdefault(k, []).append(torch.nn.functional.normalize(r, dim=-1))
            toks.append(t.half())
    tokens = torch.cat(toks).reshape(n, S * V, *toks[0].shape[1:])
    readouts = {k: torch.cat(v).reshape(n, S * V, -1) for k, v in reads.items()}
    if path is not None:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        torch.save({"tokens": tokens, "readouts": readouts}, path)
    return backbone, tokens, {k: v.numpy() for k, v in readouts.items()}


def train_head(backbone, tokens: torch.Tensor, ids: list[str], mc: ModelConfig,
               log_every: int = 0) -> tuple[MAPHead, float, list[float]]:
    """Train a MAP head (the production start, or mean pooling with head_init "mean") on cached
    tokens with the production step (`training.fit`: optimizer, schedule, step counts, the step)."""
    torch.manual_seed(mc.train_seed)
    head = initial_head(backbone, mc.train_seed)
    if mc.head_init == "mean":
        mean_pool_head_init_(head)
    head.train()
    loss_fn = build_loss(mc.loss, **mc.loss_params())
    opt = fit.build_optimizer(head, mc, loss_fn)
    n = tokens.shape[0]
    per = fit.per_worker_batch(mc.batch_size)
    steps_per_epoch = fit.steps_per_epoch(n, mc.batch_size)
    sched = fit.build_schedule(opt, mc, steps_per_epoch * mc.epochs)
    step = fit.TrainStep(head, loss_fn, opt, sched, fit.build_scaler(None), clip_params=head.parameters(),
                         grad_clip=mc.grad_clip, n_positives=N_POSITIVES, token_dropout=mc.token_dropout,
                         keep_prefix=backbone.num_prefix_tokens, seed=mc.train_seed)
    valid = np.ones((n, tokens.shape[1]), bool)
    id_arr = np.array(ids, dtype=object)
    losses = []
    t0 = time.perf_counter()
    for epoch in range(mc.epochs):
        order = np.random.default_rng(mc.train_seed * 1000 + epoch).permutation(n)
        for b in range(steps_per_epoch):
            rows = order[b * per:(b + 1) * per]
            anchor, pos, pos_mask, neg, neg_mask = draw_batch(id_arr[rows], valid[rows], mc.train_seed,
                                                              epoch, N_POSITIVES, N_DISTRACTORS)
            index = np.concatenate([anchor[:, None], pos, neg], axis=1)
            out, _ = step(tokens[torch.as_tensor(rows)[:, None], torch.as_tensor(index)].float(),
                          pos_mask, neg_mask)
            losses.append(float(out.loss.detach()))
        if log_every and (epoch + 1) % log_every == 0:
            print(f"  epoch {epoch + 1}: loss {np.mean(losses[-steps_per_epoch:]):.3f}", flush=True)
    head.eval()
    return head, time.perf_counter() - t0, losses


@torch.no_grad()
def embed(head: MAPHead, tokens: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    n, slots = tokens.shape[:2]
    flat = tokens.reshape(n * slots, *tokens.shape[2:])
    out = [torch.nn.functional.normalize(head(flat[i:i + chunk].float()), dim=-1)
           for i in range(0, flat.shape[0], chunk)]
    return torch.cat(out).reshape(n, slots, -1).numpy()


def scores(emb: np.ndarray, data: WorldData, split: str) -> dict:
    """Pooled SSR / PA over the split's rows (one row per identity and setting)."""
    keep = data.splits == split
    ids = [i for i, k in zip(data.ids, keep) if k]
    sims = item_sims(ids, emb[keep], np.ones(emb[keep].shape[:2], bool), data.sources, data.settings)
    s = nearid_scores(sims)
    return {"ssr": s["ssr"], "pa": s["pa"], "n": s["n"]}


def attribute_wins(emb: np.ndarray, data: WorldData, split: str = "test") -> dict[str, float]:
    """% of distractors beaten on both of their terms, by changed attribute (a distractor with
    two changes counts for both), over the split."""
    e = emb.reshape(emb.shape[0], len(data.sources), N_VIEWS, -1)
    wins: dict[str, list[bool]] = {}
    for i in np.flatnonzero(data.splits == split):
        pos = e[i, 0]
        sim = pos @ pos.T
        for s in range(len(data.settings)):
            for a in range(N_VIEWS):
                cross = float(pos[a] @ e[i, 1 + s, a])
                ok = all(sim[a, j] > cross for j in range(N_VIEWS) if j != a)
                for attr in data.changed[i][s][a]:
                    wins.setdefault(attr, []).append(ok)
    return {k: 100.0 * float(np.mean(v)) for k, v in sorted(wins.items())}


def run_study(wc: WorldConfig, mc: ModelConfig, log_every: int = 0, use_cache: bool = True) -> dict:
    """Render (cached unless use_cache=False), extract, train, evaluate; returns a flat dict of
    results (keys <scorer>_<split>_ssr/_pa for scorer map, mean, head; seconds; win rates by
    changed attribute; and the objects under keys starting with '_')."""
    torch.set_num_threads(mc.threads)
    data = render_world(wc, use_cache)
    t0 = time.perf_counter()
    backbone, tokens, readouts = extract(data, mc, cache_key=wc.key() if use_cache else None)
    extract_s = time.perf_counter() - t0
    train_mask = data.splits == "train"
    train_ids = [i for i, k in zip(data.ids, train_mask) if k]
    head, train_s, losses = train_head(backbone, tokens[torch.as_tensor(train_mask)], train_ids, mc,
                                       log_every)
    out = {"render_s": round(data.render_seconds, 1), "extract_s": round(extract_s, 1),
           "train_s": round(train_s, 1), "final_loss": round(float(np.mean(losses[-10:])), 3),
           "tokens": int(tokens.shape[2]), "redrawn_pct": round(100 * data.redrawn, 1)}
    trained = embed(head, tokens)
    out["frozen"] = sorted(readouts)
    for name, emb in (*sorted(readouts.items()), ("head", trained)):
        for split in ("test", "train"):
            s = scores(emb, data, split)
            out[f"{name}_{split}_ssr"], out[f"{name}_{split}_pa"] = round(s["ssr"], 1), round(s["pa"], 1)
    out["head_attr_wins"] = {k: round(v, 1) for k, v in attribute_wins(trained, data).items()}
    first = sorted(readouts)[0]
    out["frozen_attr_wins"] = {k: round(v, 1) for k, v in attribute_wins(readouts[first], data).items()}
    out["_head"], out["_data"], out["_tokens"], out["_backbone"] = head, data, tokens, backbone
    return out


def print_table(rows: list[tuple[str, dict]]) -> None:
    """One line per run: frozen readouts and trained head, test and train SSR/PA, seconds."""
    frozen = rows[0][1]["frozen"]
    cols = ([f"{k}_test_ssr" for k in frozen] + [f"{k}_test_pa" for k in frozen]
            + ["head_test_ssr", "head_test_pa", "head_train_ssr", "train_s", "render_s", "extract_s"])
    print("| run | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in rows:
        print(f"| {name} | " + " | ".join(str(r[c]) for c in cols) + " |")
    for name, r in rows:
        print(f"{name}: head wins by attribute {r['head_attr_wins']}; {r['frozen'][0]} {r['frozen_attr_wins']}")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of WorldConfig and ModelConfig (same names, dashes)."""
    for cls in (WorldConfig, ModelConfig):
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            if f.name in ("split", "area_range"):
                parser.add_argument(flag, type=float, nargs=len(default), default=list(default))
            elif f.name == "settings":
                parser.add_argument(flag, default=",".join(f"{n}:{c}" for n, c in default),
                                    help="name:n_changes,...")
            elif isinstance(default, bool):
                parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
            else:
                parser.add_argument(flag, type=type(default), default=default)


def configs_from(args: argparse.Namespace) -> tuple[WorldConfig, ModelConfig]:
    w = {f.name: getattr(args, f.name) for f in fields(WorldConfig)}
    w["split"], w["area_range"] = tuple(w["split"]), tuple(w["area_range"])
    w["settings"] = tuple((n, int(c)) for n, c in (p.split(":") for p in w["settings"].split(",")))
    m = {f.name: getattr(args, f.name) for f in fields(ModelConfig)}
    return WorldConfig(**w), ModelConfig(**m)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    parser.add_argument("--name", default="run")
    parser.add_argument("--log-every", type=int, default=0)
    args = parser.parse_args(argv)
    wc, mc = configs_from(args)
    r = run_study(wc, mc, log_every=args.log_every)
    print_table([(args.name, r)])
    print(json.dumps({"world": asdict(wc), "model": asdict(mc)}))
    return r


if __name__ == "__main__":
    main()
