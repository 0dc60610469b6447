"""Writing an evaluation: Table 1 (Markdown, CSV, LaTeX), per-setting tables, plots, MLflow."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from .. import report
from ..benchmarks import registry
from ..images import decode_image
from ..schema import DISTRACTORS, POSITIVES
from ..scorers import parse_scorer


def per_setting_ssr(details: dict) -> pd.DataFrame:
    cols = {}
    for scorer, d in details.items():
        t = d["table"]
        cols[scorer] = t[~t["setting"].isin(report.GROUP_ROWS)].set_index("setting")["ssr"]
    return pd.DataFrame(cols)


def hardest_failures(storage, sims: pd.DataFrame, k: int = 4) -> list[tuple]:
    """(label, anchor view, positive view, the distractor that beat it) for the k worst rows."""
    pairs = [("sim_01", 0, 1), ("sim_02", 0, 2), ("sim_12", 1, 2)]
    worst = []
    for r in sims.itertuples():
        for col, i, j in pairs:
            s = getattr(r, col)
            for a, b in ((i, j), (j, i)):
                c = getattr(r, f"cross_{a}{a}")
                if np.isfinite(s) and np.isfinite(c):
                    worst.append((s - c, r.id, r.setting, a, b))
    worst.sort()
    out, seen = [], set()
    for margin, id_, setting, a, b in worst:
        if id_ in seen or margin > 0:
            continue
        seen.add(id_)
        pos = storage.read_table(POSITIVES.name, columns=["view", "image"], filter=pc.field("id") == id_)
        views = dict(zip(pos["view"].to_pylist(), pos["image"].to_pylist()))
        d = storage.read_table(DISTRACTORS.name, columns=["image"],
                               filter=(pc.field("id") == id_) & (pc.field("setting") == setting)
                               & (pc.field("view") == a))
        if a not in views or b not in views or d.num_rows == 0:
            continue
        out.append((f"{id_}\n{setting} m={margin:.2f}", decode_image(views[a]), decode_image(views[b]),
                    decode_image(d["image"][0].as_py())))
        if len(out) == k:
            break
    return out


def write_report(storage, tracker, result: dict, name: str, plots: bool = True,
                 scorer_params: dict[str, dict] | None = None) -> dict:
    """Files under reports/<name>/ and the same table + plots on the MLflow run; each scorer's
    results on a child run (params: `scorer_params["*"]` + `scorer_params[scorer]`). The `sims`
    tables are the evaluate stage's (`evaluate.write_sims`, called by `run_evaluate`)."""
    df = report.results_table(result["rows"])
    md = report.to_markdown(df)
    base = f"reports/{name}"
    storage.write_bytes(f"{base}/table.md", (md + "\n").encode())
    storage.write_bytes(f"{base}/table.csv", df.to_csv().encode())
    storage.write_bytes(f"{base}/table.tex", (report.to_latex(df) + "\n").encode())
    settings_md = report.to_markdown(report.settings_table(result["details"]))
    storage.write_bytes(f"{base}/settings.md", (settings_md + "\n").encode())
    per_setting = {}
    for scorer, d in result["details"].items():
        t = d["table"]
        per_setting[scorer] = t.to_dict(orient="records")
    storage.write_json(f"{base}/per_setting.json", per_setting)
    storage.write_json(f"{base}/timing.json", result["timing"])
    if tracker is not None:
        tracker.log_text(md, "report/table.md")
        tracker.log_text(settings_md, "report/settings.md")
        tracker.log_text(df.to_csv(), "report/table.csv")
        tracker.log_text(report.to_latex(df), "report/table.tex")
        tracker.log_text(json.dumps(per_setting, indent=2, default=float), "report/per_setting.json")
        tracker.log_metrics({f"timing/{k}": v for k, v in result["timing"].items()})
        _log_scorer_runs(tracker, result, name, scorer_params or {})
    if plots:
        _log_plots(storage, tracker, result, base)
    return {"markdown": md, "frame": df, "settings_markdown": settings_md}


def scorer_metrics(row: dict, table=None) -> tuple[dict, dict]:
    """(metrics, count params) of one scorer's row (+ per-setting SSR/PA from its table). Metric
    names are the benchmarks' (`registry.metric_names`), the same for every scorer's run so that
    MLflow's compare view lines them up; counts go to params."""
    names, count_params = registry.metric_names(), registry.count_params()
    metrics, counts = {}, {}
    for k, v in row.items():
        if k == "scorer" or not isinstance(v, (int, float)) or v != v:
            continue
        if k in count_params or k.endswith("_n") or k == "n":
            counts[count_params.get(k, f"count.{k}")] = int(v)
        else:
            metrics[names.get(k, f"eval/{k}")] = float(v)
    if table is not None:
        for r in table.itertuples():
            if r.setting != "pooled":
                metrics[f"setting/{r.setting}/ssr"], metrics[f"setting/{r.setting}/pa"] = r.ssr, r.pa
    return metrics, counts


def _log_scorer_runs(tracker, result: dict, name: str, scorer_params: dict) -> None:
    """One child run per scorer under the evaluation's run, all with the same metric names."""
    for r in result["rows"]:
        scorer = r["scorer"]
        d = result["details"].get(scorer, {})
        metrics, counts = scorer_metrics(r, d.get("table"))
        params = {**scorer_params.get("*", {}), "scorer": scorer, **scorer_params.get(scorer, {}), **counts}
        tags = {"stage": "evaluate-scorer", "scorer": scorer}
        if params.get("model_uri"):
            tags["model_uri"] = params["model_uri"]
        with tracker.child_run(f"{name}/{scorer}", tags=tags) as child:
            child.log_params(params)
            child.log_metrics(metrics)


def _log_plots(storage, tracker, result: dict, base: str) -> None:
    """The report's figures, as PNG files under `<base>/plots/` and on the MLflow run."""
    plt = report.pyplot()
    det = result["details"]
    figs = {
        "plots/margin_histograms.png": report.margin_histograms({s: d["margins"] for s, d in det.items()}),
        "plots/similarity_tiers.png": report.tier_distributions({s: d["tiers"] for s, d in det.items()}),
        "plots/ssr_per_setting.png": report.ssr_bars(per_setting_ssr(det)),
    }
    trained = [s for s in det if parse_scorer(s).kind == "nearid"] or list(det)
    grid = report.example_grid(hardest_failures(storage, det[trained[-1]]["sims"]),
                               titles=("anchor", "positive", "distractor that won"))
    if grid is not None:
        figs["plots/hardest_failures.png"] = grid
    for name, fig in figs.items():
        storage.write_bytes(f"{base}/{name}", figure_png(fig))
        if tracker is not None:
            tracker.log_figure(fig, name)
        plt.close(fig)


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def run_evaluate(cfg, storage, ray=None, tracker=None, scorers: list[str] | None = None,
                 name: str | None = None) -> dict:
    """The evaluate stage: every benchmark for every scorer, the report files, one MLflow run
    (params `eval.*`, tags stage/backbone/data/model_uri, the report and plots) with one child
    run per scorer (same metric names for every scorer: `eval/ssr`, `mtg/m_o`, ...); used by `jobs.evaluate`, the pipeline and
    `nearid evaluate`. Returns {"rows", "timing", "markdown", "settings_markdown", "name"}."""
    from ..config import config_to_dict, flatten
    from .evaluate import evaluate_scorers, write_sims

    scorers = scorers or cfg.eval.scorers
    if not storage.table_exists("features"):
        raise ValueError(f"{storage.uri('features')}: no features table in this run root; run "
                         "jobs.extract (or jobs.pipeline) first")
    if ray is None and any(parse_scorer(s).may_extract for s in scorers):
        from ..raytools import init_ray

        ray = init_ray(cfg)
    name = name or f"{cfg.run.name}-eval"
    if tracker is None:
        from ..tracking import Tracker

        tracker = Tracker.from_config(cfg, storage)
    eval_params = {k: v for k, v in flatten(config_to_dict(cfg)).items() if k.startswith("eval.")}
    scorer_params = {"*": eval_params, **{s: evaluated_model(cfg, storage, s) for s in scorers}}
    with tracker.run(name, tags={"stage": "evaluate", "data": storage.root,
                                 "backbone": cfg.extract.backbone.name, "scorers": ",".join(scorers)}):
        tracker.log_params(eval_params)
        models = sorted({p["model_uri"] for p in scorer_params.values() if p.get("model_uri")})
        if models:
            tracker.set_tags({"model_uri": ",".join(models)})
        result = evaluate_scorers(cfg, storage, scorers, ray)
        write_sims(storage, result["details"])
        out = write_report(storage, tracker, result, name, plots=cfg.eval.plots, scorer_params=scorer_params)
    return {"rows": result["rows"], "timing": result["timing"], "markdown": out["markdown"],
            "settings_markdown": out["settings_markdown"], "name": name, "tracker": tracker}


def evaluated_model(cfg, storage, scorer: str) -> dict:
    """For a `nearid` scorer: the model dir it scores with and, when run_train published it with
    tracking on (its train_summary.json says so), the registered version and the training run."""
    from ..config import model_dir_for
    from .evaluate import default_model_dir

    sc = parse_scorer(scorer)
    if sc.kind != "nearid":
        return {}
    model_dir = sc.model or default_model_dir(cfg, storage)
    out = {"model_dir": model_dir}
    summary = {}
    try:
        if sc.model is None:
            rel = model_dir_for(cfg)
            if storage.exists(rel, "train_summary.json"):
                summary = storage.read_json(f"{rel}/train_summary.json")
        elif os.path.isfile(os.path.join(model_dir, "train_summary.json")):
            with open(os.path.join(model_dir, "train_summary.json")) as f:
                summary = json.load(f)
    except Exception:  # noqa: BLE001 - provenance is a nicety, never a reason to fail
        summary = {}
    ml = summary.get("mlflow") or {}
    if ml.get("version_uri") or ml.get("model_uri"):
        out["model_uri"] = ml.get("version_uri") or ml["model_uri"]
    if ml.get("version"):
        out["model_version"] = f"{ml.get('registered_model')}/{ml['version']}"
    if ml.get("run_id"):
        out["model_run_id"] = ml["run_id"]
    return out


def print_evaluation(cfg, storage, out: dict) -> None:
    print(f"\nNearID benchmark ({cfg.eval.split} split), MTG and DreamBench++-style graded pairs:\n")
    print(out["markdown"])
    print("\nper setting (SSR / PA; seen = trained on, unseen = generators never trained on):\n")
    print(out["settings_markdown"])
    t = out["timing"]
    print(f"\nembedding {t['embedding_s']:.2f}s, metrics {t['metrics_s']:.2f}s; "
          f"report: {storage.uri('reports', out['name'])}; MLflow: {out['tracker'].ui_hint()}")


def add_evaluate_args(p) -> None:
    p.add_argument("--scorers", nargs="*", default=None,
                   help="e.g. frozen:map frozen:mean nearid nearid:runs/x/models/y (default: eval.scorers)")
    p.add_argument("--name", default=None, help="report name (default: <run>-eval)")
