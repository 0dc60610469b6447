"""Sweep the synthetic world's distractor closeness dial and chart where identity discrimination
breaks: SSR and PA on held-out identities for the backbone's frozen readouts (map / cls, mean) and
the trained head.

    python -m bench.closeness_sweep --points 0,0.25,0.5,0.75,1 [--out runs/closeness] [world_study flags]

Every point renders its own world (cached under /tmp/nearid_world_cache), extracts frozen tokens,
trains a head with the given recipe and scores the test split. Writes closeness.csv and
closeness.png (two panels: SSR, PA) into --out and prints the table.
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

from bench.world_study import add_flags, configs_from, run_study

def sweep(points: list[float], wc, mc) -> list[dict]:
    """One result row per closeness value: {closeness, <scorer>_ssr, <scorer>_pa, train_s}."""
    rows = []
    for c in points:
        r = run_study(replace(wc, closeness=float(c)), mc)
        row = {"closeness": float(c), "train_s": r["train_s"], "head_train_ssr": r["head_train_ssr"]}
        for s in scorers(r):
            row[f"{s}_ssr"], row[f"{s}_pa"] = r[f"{s}_test_ssr"], r[f"{s}_test_pa"]
        rows.append(row)
        print(row, flush=True)
    return rows


def scorers(result: dict) -> list[str]:
    """The frozen readouts the study scored (map/mean for SigLIP, cls/mean for DINOv2), then head."""
    return [*result["frozen"], "head"]


def write_outputs(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """closeness.csv and closeness.png (SSR and PA against closeness, one line per scorer)."""
    from nearid.report import pyplot

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "closeness.csv", out / "closeness.png"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    x = [r["closeness"] for r in rows]
    names = [k[:-4] for k in rows[0] if k.endswith("_ssr") and k != "head_train_ssr"]
    for ax, metric in zip(axes, ("ssr", "pa")):
        for s in names:
            label = "trained NearID head" if s == "head" else f"frozen {s}"
            ax.plot(x, [r[f"{s}_{metric}"] for r in rows], marker="o", label=label)
        ax.set_xlabel("distractor closeness (0 = bold changes, 1 = subtle)")
        ax.set_ylabel(f"test {metric.upper()} (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    parser.add_argument("--points", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--out", default="runs/closeness")
    args = parser.parse_args(argv)
    wc, mc = configs_from(args)
    rows = sweep([float(p) for p in args.points.split(",")], wc, mc)
    csv_path, png_path = write_outputs(rows, Path(args.out))
    names = [k[:-4] for k in rows[0] if k.endswith("_ssr") and k != "head_train_ssr"]
    cols = [f"{s}_{m}" for m in ("ssr", "pa") for s in names] + ["head_train_ssr"]
    print("| closeness | " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['closeness']} | " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"wrote {csv_path} and {png_path}")
    _log_to_mlflow(rows, png_path, Path(args.out), vars(args))
    return rows


def _log_to_mlflow(rows: list[dict], png_path: Path, out: Path, flags: dict) -> None:
    """One MLflow run: the flags as params, one step per closeness point, the chart as artifact."""
    from nearid.tracking import Tracker

    tracker = Tracker(f"sqlite:///{out.resolve()}/mlflow.db", "nearid-closeness")
    with tracker.run("closeness-sweep", tags={"stage": "closeness"}):
        tracker.log_params({k: v for k, v in flags.items() if v is not None})
        for i, r in enumerate(rows):
            tracker.log_metrics({k: v for k, v in r.items()}, step=i)
        tracker.log_artifact(png_path, "plots")
    print(f"MLflow: {tracker.ui_hint()}")


if __name__ == "__main__":
    main()
