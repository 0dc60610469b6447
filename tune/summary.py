"""After a sweep: evaluate each trial's chosen checkpoint, close the trials' MLflow child runs,
publish the best model, and write the tables (trials, ablation) and the hyper-parameter plot."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pandas as pd

from nearid.benchmarks import registry
from nearid.config import Config
from tune.search import TIE_EPS, tie_broken
from tune.space import RUN_KEY, effective_params, trial_params

log = logging.getLogger("nearid.tune")


# ---- after the sweep: evaluate, publish, tables, plot ------------------------------------------------
def _on_storage(checkpoint) -> bool:
    import pyarrow.fs as pafs

    return checkpoint.filesystem.get_file_info(checkpoint.path).type != pafs.FileType.NotFound


def _pick_checkpoint(result, which: str, metric: str, mode: str, tie_break: str | None):
    if which == "best":
        # Tune lists every checkpoint it saw; tune.state.prune_finished deleted the surplus ones
        pairs = [(c, tie_broken(m, metric, tie_break, mode)[metric])
                 for c, m in (result.best_checkpoints or []) if m.get(metric) is not None and _on_storage(c)]
        if pairs:
            pick = max if mode == "max" else min
            return pick(pairs, key=lambda cs: cs[1])[0]
    return result.checkpoint


def evaluate_model_dir(cfg: Config, storage, model_dir: str, split: str) -> dict:
    """The benchmarks' headline values (NearID SSR/PA, MTG M-O, DB++ M-H: `registry.headline`) of
    one model dir on one split, by short name (NaN where absent)."""
    from nearid.stages.evaluate import evaluate_scorers

    sub = cfg.model_copy(deep=True)
    sub.eval.split = split
    row = evaluate_scorers(sub, storage, [f"nearid:{model_dir}"])["rows"][0]
    return {c.short: float(row.get(c.key, math.nan)) for c in registry.headline()}


def _evaluate_checkpoint(cfg, storage, ckpt, split: str) -> dict:
    if ckpt is None:
        return {}
    with ckpt.as_directory() as d:
        return evaluate_model_dir(cfg, storage, d, split)


def _trial_rows(grid, cfg, base_cfg, storage, space, max_t) -> list[dict]:
    tc = base_cfg.tune
    rows = []
    for result in grid:
        config = result.config or {}
        hp = trial_params(config)
        df = result.metrics_dataframe
        metrics = result.metrics or {}
        reports = int(metrics.get("training_iteration", 0))
        best, score = math.nan, math.nan
        if df is not None and tc.metric in df and df[tc.metric].notna().any():
            sign = 1.0 if tc.mode == "max" else -1.0
            scores = df[tc.metric] + (sign * TIE_EPS * df[space.tie_break].fillna(0)
                                      if space.tie_break and space.tie_break in df else 0)
            best = float(df[tc.metric].max() if tc.mode == "max" else df[tc.metric].min())
            score = float(scores.max() if tc.mode == "max" else scores.min())
        outcome = "error" if result.error else ("stopped_early" if reports < max_t else "completed")
        ckpt = _pick_checkpoint(result, space.checkpoint, tc.metric, tc.mode, space.tie_break)
        ev = _evaluate_checkpoint(cfg, storage, ckpt, space.evaluate_split)
        rows.append({"trial": Path(result.path).name, "loss": hp.get("loss", base_cfg.train.loss.name),
                     "params": {k: v for k, v in hp.items() if k != "loss"},
                     f"best_{tc.metric}": best, "score": score, "reports": reports, "outcome": outcome,
                     "run_id": config.get(RUN_KEY), "checkpoint": ckpt, "config": hp,
                     **{f"{space.evaluate_split}_{k}": v for k, v in ev.items()}})
    return rows


def _log_child_results(tracker, rows, split, metric) -> None:
    for r in rows:
        if not r["run_id"]:
            continue
        child = tracker.for_run(r["run_id"])
        vals = {k: r[k] for k in r if k.startswith(f"{split}_") or k == f"best_{metric}"}
        child.log_metrics({f"final/{k}": v for k, v in vals.items() if isinstance(v, float)})
        child.set_tags({"tune.outcome": r["outcome"], "tune.reports": str(r["reports"])})
        child.end("FAILED" if r["outcome"] == "error" else "FINISHED")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}")
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def trials_frame(rows: list[dict], metric: str, split: str) -> pd.DataFrame:
    out = []
    for r in rows:
        hp = ", ".join(f"{k.split('.', 1)[-1]}={_fmt(v)}" for k, v in sorted(r["params"].items()))
        out.append({"trial": r["trial"], "loss": r["loss"], "hyper-parameters": hp,
                    f"best {metric}": r[f"best_{metric}"],
                    **{f"{split} {c.short_label}": r.get(f"{split}_{c.short}", math.nan)
                       for c in registry.headline()},
                    "reports": r["reports"], "outcome": r["outcome"]})
    return pd.DataFrame(out)


def ablation_frame(rows: list[dict], split: str) -> pd.DataFrame:
    """One row per loss (mean over seeds), in the order the losses were listed."""
    heads = registry.headline()
    df = pd.DataFrame([{"loss": r["loss"], **{c.short_label: r.get(f"{split}_{c.short}", math.nan) for c in heads}}
                       for r in rows])
    order = list(dict.fromkeys(df["loss"]))
    agg = df.groupby("loss", sort=False).agg(["mean", "count"])
    out = pd.DataFrame({"loss": order})
    for c in heads:
        out[c.short_label] = [float(agg.loc[loss, (c.short_label, "mean")]) for loss in order]
    out["seeds"] = [int(agg.loc[loss, (heads[0].short_label, "count")]) for loss in order]
    return out


def hparam_figure(rows: list[dict], metric: str):
    """One scatter panel per hyper-parameter (x: value, y: the trial's best metric), one marker
    colour per loss; log x for parameters that span more than a decade."""
    from nearid.report import pyplot

    plt = pyplot()
    names = sorted({k for r in rows for k in r["params"]})
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    colours = {loss: plt.cm.tab10(i % 10) for i, loss in enumerate(losses)}
    panels = ["loss", *names]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for loss in losses:
            pts = [(losses.index(r["loss"]) if name == "loss" else r["params"].get(name), r[f"best_{metric}"])
                   for r in rows if r["loss"] == loss]
            pts = [(x, y) for x, y in pts if x is not None and isinstance(x, (int, float))]
            if pts:
                ax.scatter(*zip(*pts), color=colours[loss], label=loss, s=30)
        if name == "loss":
            ax.set_xticks(range(len(losses)), losses, rotation=30, fontsize=7)
        else:
            xs = [r["params"][name] for r in rows if isinstance(r["params"].get(name), (int, float))]
            if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
        ax.set_xlabel(name), ax.set_ylabel(metric)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"hyper-parameters vs {metric} (best report of each trial)")
    fig.tight_layout()
    return fig


def _summarise(grid, cfg, base_cfg, storage, tracker, space, name, max_t, t0) -> dict:
    from nearid.stages.train import publish_model

    tc = base_cfg.tune
    split = space.evaluate_split
    t_eval = time.time()
    rows = _trial_rows(grid, cfg, base_cfg, storage, space, max_t)
    _log_child_results(tracker, rows, split, tc.metric)
    key = f"best_{tc.metric}"
    ranked = [r for r in rows if not math.isnan(r[key]) and r["checkpoint"] is not None]
    if not ranked:
        tracker.end("FAILED")
        raise RuntimeError(f"sweep {name}: no trial reported {tc.metric}; errors: "
                           f"{[str(r.error)[:200] for r in grid if r.error]}")
    sign = 1 if tc.mode == "max" else -1
    best = max(ranked, key=lambda r: sign * r["score"])
    model_rel = f"models/{name}-best"
    publish_model(best["checkpoint"], storage, model_rel)
    model_dir = storage.uri(model_rel)
    test = evaluate_model_dir(cfg, storage, model_dir, cfg.eval.split)
    eval_seconds = round(time.time() - t_eval, 1)
    trials_df = trials_frame(rows, tc.metric, split)
    base = f"reports/{name}"
    storage.write_bytes(f"{base}/trials.csv", trials_df.to_csv(index=False).encode())
    md = markdown_table(trials_df)
    storage.write_bytes(f"{base}/trials.md", md.encode())
    table_md = md
    if space.compare_losses:
        ab = ablation_frame(rows, split)
        table_md = markdown_table(ab)
        storage.write_bytes(f"{base}/ablation.csv", ab.to_csv(index=False).encode())
        storage.write_bytes(f"{base}/ablation.md", table_md.encode())
        tracker.log_text(table_md, "ablation.md")
        tracker.log_text(ab.to_csv(index=False), "ablation.csv")
        for r in ab.to_dict("records"):
            tracker.log_metrics({f"ablation/{r['loss']}/{c}": r[c] for c in ("SSR", "PA", "M-O", "M-H")})
    fig = hparam_figure(rows, tc.metric)
    buf_path = storage.path(base, "hparams_vs_" + tc.metric + ".png") if not storage.is_s3 else None
    if buf_path:
        fig.savefig(buf_path, dpi=110)
    tracker.log_figure(fig, f"plots/hparams_vs_{tc.metric}.png")
    from nearid.report import pyplot

    pyplot().close(fig)
    stopped = sum(r["outcome"] == "stopped_early" for r in rows)
    errors = sum(r["outcome"] == "error" for r in rows)
    best_cfg = best["config"]
    tracker.log_params({f"best.{k}": v for k, v in effective_params(base_cfg, best_cfg).items()})
    tracker.log_metrics({f"best/{tc.metric}": best[key],
                         **{f"best/{cfg.eval.split}_{k}": v for k, v in test.items()},
                         "time/sweep_seconds": round(time.time() - t0, 1)})
    tracker.set_tags({"best_trial": best["trial"], "model_dir": model_dir,
                      "best_child_run_id": best["run_id"] or "", "count.trials": str(len(rows)),
                      "count.stopped_early": str(stopped), "count.errors": str(errors)})
    tracker.log_text(md, "trials.md")
    tracker.log_text(trials_df.to_csv(index=False), "trials.csv")
    tracker.end("FINISHED")
    summary = {"name": name, "best_config": best_cfg, "best_trial": best["trial"],
               "best_val_ssr": best[key] if tc.metric == "val_ssr" else None,
               f"best_{tc.metric}": best[key], "best_eval": {cfg.eval.split: test},
               "model_dir": model_dir, "table_markdown": table_md, "trials_markdown": md,
               "trials": len(rows), "stopped_early": stopped, "errors": errors,
               "parent_run_id": tracker.run_id, "report_dir": storage.uri(base),
               "eval_seconds": eval_seconds, "seconds": round(time.time() - t0, 1)}
    log.info("sweep %s: %d trials, %d stopped early, best %s = %.2f (%s)", name, len(rows), stopped,
             tc.metric, best[key], best["trial"])
    return summary
