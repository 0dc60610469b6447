"""Tables and plots for reports: Table-1-style comparisons and the figures logged to MLflow."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .benchmarks import registry



def pyplot():
    """`matplotlib.pyplot` on the headless Agg backend: the one matplotlib setup of the project
    (reports, training curves, generation examples, sweeps and benchmarks all plot through it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def results_table(rows: list[dict]) -> pd.DataFrame:
    """rows: {"scorer": name, "nearid_ssr": .., ...} -> a Table-1-style frame (scorer index)."""
    df = pd.DataFrame(rows).set_index("scorer")
    table_columns = registry.table_columns()   # the benchmarks' columns, in the registry's order
    cols = [c for c, _ in table_columns if c in df.columns]
    extra = [c for c in df.columns if c not in cols]
    df = df[cols + extra]
    return df.rename(columns=dict(table_columns))


GROUP_ROWS = ("seen", "unseen", "pooled")


def settings_table(details: dict) -> pd.DataFrame:
    """The paper's per-setting layout: one row per setting, then seen / unseen / pooled rows;
    SSR and PA columns per scorer."""
    cols = {}
    for scorer, d in details.items():
        t = d["table"].set_index("setting")
        cols[(scorer, "SSR")], cols[(scorer, "PA")] = t["ssr"], t["pa"]
    df = pd.DataFrame(cols)
    order = [s for s in df.index if s not in GROUP_ROWS] + [g for g in GROUP_ROWS if g in df.index]
    df = df.loc[order]
    df.columns = [f"{s} {m}" for s, m in df.columns]
    df.index.name = "setting"
    return df


def to_markdown(df: pd.DataFrame, floatfmt: dict | None = None) -> str:
    counts = set(registry.count_params())   # integer columns

    def fmt(col, v):
        if isinstance(v, (float, np.floating)):
            if np.isnan(v):
                return "-"
            if col in counts:
                return str(int(v))
            return f"{v:.3f}" if ("M-" in col or "M-H" in col) else f"{v:.2f}"
        return str(v)

    head = "| " + " | ".join([df.index.name or ""] + list(df.columns)) + " |"
    sep = "|" + "---|" * (len(df.columns) + 1)
    body = ["| " + " | ".join([str(i)] + [fmt(c, r[c]) for c in df.columns]) + " |"
            for i, r in df.iterrows()]
    return "\n".join([head, sep, *body])


def to_latex(df: pd.DataFrame) -> str:
    lines = ["\\begin{tabular}{l" + "r" * len(df.columns) + "}", "\\toprule",
             " & ".join(["Scorer"] + [c.replace("_", "\\_") for c in df.columns]) + " \\\\", "\\midrule"]
    for i, r in df.iterrows():
        vals = ["-" if isinstance(v, float) and np.isnan(v) else
                (f"{v:.3f}" if "M-" in c else f"{v:.2f}") if isinstance(v, (float, np.floating)) else str(v)
                for c, v in r.items()]
        lines.append(" & ".join([str(i).replace("_", "\\_")] + vals) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def margin_histograms(margins_by_scorer: dict[str, pd.DataFrame]):
    """margins_by_scorer: scorer -> frame (setting, margin). One panel per setting."""
    plt = pyplot()
    settings = sorted({s for df in margins_by_scorer.values() for s in df["setting"].unique()})
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 2.8), squeeze=False)
    for ax, s in zip(axes[0], settings):
        for name, df in margins_by_scorer.items():
            m = df.loc[df["setting"] == s, "margin"].dropna()
            ax.hist(m, bins=40, alpha=0.55, label=name)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"margin: {s}")
        ax.set_xlabel("margin = sim(views) - sim(view, distractor)")
    axes[0][0].set_ylabel("margin terms")
    axes[0][0].legend(fontsize=9, title="scorer", title_fontsize=9)
    fig.tight_layout()
    return fig


def tier_distributions(tiers_by_scorer: dict[str, dict[str, np.ndarray]]):
    """Three-tier similarity distributions: same identity / distractor / random negative."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tiers_by_scorer), figsize=(3.6 * len(tiers_by_scorer), 2.8),
                             squeeze=False)
    for ax, (name, tiers) in zip(axes[0], tiers_by_scorer.items()):
        for tier, vals in tiers.items():
            ax.hist(vals, bins=40, alpha=0.55, label=tier, density=True)
        ax.set_title(name)
        ax.set_xlabel("cosine similarity")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=9)
    fig.tight_layout()
    return fig


def ssr_bars(per_setting: pd.DataFrame):
    """per_setting: index setting, one column per scorer (SSR)."""
    plt = pyplot()
    ax = per_setting.plot.bar(figsize=(1.2 * len(per_setting) + 3, 3.2))
    ax.set_ylabel("SSR (%)")
    ax.set_xlabel("distractor setting")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=9, title="scorer")
    # a bar at 0 is a result, not missing data: label every bar with its value
    for container in ax.containers:
        ax.bar_label(container, fmt="%.1f", fontsize=8, padding=1)
    fig = ax.get_figure()
    fig.tight_layout()
    return fig


def example_grid(examples: list[tuple], titles=("view", "distractor", "mask")):
    """examples: (label, img_a, img_b, img_c) tuples of PIL images -> a grid figure."""
    if not examples:
        return None
    plt = pyplot()
    n = len(examples)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for r, (label, *imgs) in enumerate(examples):
        for c, im in enumerate(imgs[:3]):
            ax = axes[r][c]
            ax.imshow(np.asarray(im), cmap="gray" if getattr(im, "mode", "") == "L" else None)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        axes[r][0].set_ylabel(str(label), fontsize=7)
    fig.tight_layout()
    return fig
