"""Writing an evaluation: Table 1 (Markdown, CSV, LaTeX), per-setting tables, plots, MLflow."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .. import report
from ..images import decode_image
from ..schema import DISTRACTORS, POSITIVES


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


def write_report(storage, tracker, result: dict, name: str, plots: bool = True) -> dict:
    """Files under reports/<name>/ and the same table + plots on the MLflow run."""
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
        tag = scorer.replace(":", "_").replace("/", "_")[-60:]
        sims = d["sims"]
        storage.replace_table(f"sims_{tag}", pa.Table.from_pandas(sims, preserve_index=False), [])
    storage.write_json(f"{base}/per_setting.json", per_setting)
    storage.write_json(f"{base}/timing.json", result["timing"])
    if tracker is not None:
        tracker.log_text(md, "report/table.md")
        tracker.log_text(settings_md, "report/settings.md")
        tracker.log_text(df.to_csv(), "report/table.csv")
        tracker.log_text(report.to_latex(df), "report/table.tex")
        tracker.log_text(json.dumps(per_setting, indent=2, default=float), "report/per_setting.json")
        for r in result["rows"]:
            s = r["scorer"].replace(":", "_")
            tracker.log_metrics({f"{s}.{k}": v for k, v in r.items()
                                 if k != "scorer" and isinstance(v, (int, float)) and v == v})
        tracker.log_metrics({f"timing.{k}": v for k, v in result["timing"].items()})
        if plots:
            _log_plots(storage, tracker, result)
    return {"markdown": md, "frame": df, "settings_markdown": settings_md}


def _log_plots(storage, tracker, result: dict) -> None:
    import matplotlib.pyplot as plt

    det = result["details"]
    figs = {
        "plots/margin_histograms.png": report.margin_histograms({s: d["margins"] for s, d in det.items()}),
        "plots/similarity_tiers.png": report.tier_distributions({s: d["tiers"] for s, d in det.items()}),
        "plots/ssr_per_setting.png": report.ssr_bars(per_setting_ssr(det)),
    }
    trained = [s for s in det if s.startswith("nearid")] or list(det)
    grid = report.example_grid(hardest_failures(storage, det[trained[-1]]["sims"]),
                               titles=("anchor", "positive", "distractor that won"))
    if grid is not None:
        figs["plots/hardest_failures.png"] = grid
    for name, fig in figs.items():
        tracker.log_figure(fig, name)
        plt.close(fig)


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def run_evaluate(cfg, storage, ray=None, tracker=None, scorers: list[str] | None = None,
                 name: str | None = None) -> dict:
    """The evaluate stage: every benchmark for every scorer, the report files, one MLflow run
    (params `eval.*`, tags stage/backbone/data); used by `jobs.evaluate`, the pipeline and
    `nearid evaluate`. Returns {"rows", "timing", "markdown", "settings_markdown", "name"}."""
    from ..config import config_to_dict, flatten
    from .evaluate import evaluate_scorers

    scorers = scorers or cfg.eval.scorers
    if ray is None and any(s.startswith("nearid") for s in scorers):
        from ..raytools import init_ray

        ray = init_ray(cfg)
    name = name or f"{cfg.run.name}-eval"
    if tracker is None:
        from ..tracking import Tracker

        tracker = Tracker.from_config(cfg, storage)
    with tracker.run(name, tags={"stage": "evaluate", "data": storage.root,
                                 "backbone": cfg.extract.backbone.name}):
        tracker.log_params({k: v for k, v in flatten(config_to_dict(cfg)).items() if k.startswith("eval.")})
        result = evaluate_scorers(cfg, storage, scorers, ray)
        out = write_report(storage, tracker, result, name, plots=cfg.eval.plots)
    return {"rows": result["rows"], "timing": result["timing"], "markdown": out["markdown"],
            "settings_markdown": out["settings_markdown"], "name": name, "tracker": tracker}


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
