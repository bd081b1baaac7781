"""Figures from the tables of `barkbench aggregate` (PNG, ~110 dpi): a registry name -> draw function and
caption. Every registered figure is always written (with a "no data" note if empty), with the Markdown that
places it in the report (`figures.md`, captions beside their figures)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

from barkbench.aggregate import read_csv  # noqa: E402
from barkbench.results import write_atomic  # noqa: E402
from barkbench.tables import STAGES, json_list  # noqa: E402
from barkbench.tables import variant_order as _variant_order  # noqa: E402

DPI = 110


def variant_order(variants, baseline=None):
    return _variant_order(variants, baseline)


def _save(fig, path: Path) -> Path:
    """Render the PNG, then write it atomically (`results.write_atomic`)."""
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    write_atomic(path, png.getvalue())
    return path


def _no_data(path: Path, title: str, note: str = "no data") -> Path:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=12, color="0.4", transform=ax.transAxes)
    return _save(fig, path)


def _baseline(df: pd.DataFrame):
    return df["baseline"].iloc[0] if len(df) and "baseline" in df else None


def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    if runs.empty:
        return runs
    ok = runs[(runs["status"] == "ok") & runs["instrumented"]].copy()
    ok["setup"] = ok["hardware"].astype(str) + " · " + ok["model"].astype(str)
    return ok


def _panels(ok: pd.DataFrame, per_batch: bool = True, width: float = 4.8, row_height: float | None = None):
    """Grid with one row per hardware·model and one column per batch size; yields (ax, subset, title)."""
    setups = sorted(ok["setup"].unique())
    batches = sorted(ok["batch_size"].unique()) if per_batch else [None]
    n_var = max(1, ok["variant"].nunique())
    row_height = row_height or 1.2 + 0.35 * n_var
    fig, axes = plt.subplots(len(setups), len(batches), squeeze=False,
                             figsize=(width * len(batches), row_height * len(setups) + 0.6))
    panels = []
    for i, setup in enumerate(setups):
        for j, bs in enumerate(batches):
            sub = ok[ok["setup"] == setup]
            if bs is not None:
                sub = sub[sub["batch_size"] == bs]
            title = setup if bs is None else f"{setup}\nbatch size {bs}"
            order = variant_order(sub["variant"], _baseline(sub))
            sub = sub.set_index("variant").loc[order].reset_index() if len(sub) else sub
            panels.append((axes[i][j], sub, title))
    return fig, panels


def _barh(ax, sub, values, xerr=None, color=None):
    y = np.arange(len(sub))
    ax.barh(y, values, xerr=xerr, color=color or sns.color_palette()[0], capsize=3)
    ax.set_yticks(y, sub["variant"])
    ax.invert_yaxis()


def _per_batch_figure(runs: pd.DataFrame, path, title: str, draw: Callable) -> Path:
    """One panel per hardware·model and batch size of the ok runs, `draw(ax, runs of the panel)` filling each
    panel that has runs (a "no data" figure when none is ok)."""
    path, ok = Path(path), _ok(runs)
    if ok.empty:
        return _no_data(path, title)
    fig, panels = _panels(ok)
    for ax, sub, panel_title in panels:
        if sub.empty:
            ax.set_axis_off()
            continue
        draw(ax, sub)
        ax.set_title(panel_title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def latency_figure(runs: pd.DataFrame, path) -> Path:
    """Latency per variant (geometric mean over its processes), one panel per batch size. Error bars: its t
    interval on the run's pooled between-process variance, else the range min-max of the calls (hatched)."""
    def draw(ax, sub):
        med = sub["latency_gmean"].to_numpy(float)
        has_ci = sub["latency_ci_low"].notna().to_numpy()
        low = np.where(has_ci, sub["latency_ci_low"].to_numpy(float), sub["latency_min"].to_numpy(float))
        high = np.where(has_ci, sub["latency_ci_high"].to_numpy(float), sub["latency_max"].to_numpy(float))
        _barh(ax, sub, med, xerr=np.clip(np.vstack([med - low, high - med]), 0, None))
        for patch, ci in zip(ax.patches, has_ci):
            if not ci:
                patch.set_hatch("//")
        ax.set_xlabel("latency per generate call, s (geometric mean over processes)")

    return _per_batch_figure(runs, path, "Latency per variant", draw)


def memory_figure(runs: pd.DataFrame, path) -> Path:
    """Peak memory per variant (CUDA peak allocated on GPU, peak RSS on CPU), one panel per batch size."""
    def draw(ax, sub):
        _barh(ax, sub, sub["peak_memory_mb"].to_numpy(float), color=sns.color_palette()[1])
        kinds = ", ".join(sorted(str(k).replace("_", " ") for k in sub["memory_kind"].dropna().unique()))
        ax.set_xlabel(f"peak memory, MB ({kinds})")

    return _per_batch_figure(runs, path, "Peak memory per variant", draw)


def throughput_figure(runs: pd.DataFrame, path) -> Path:
    """Throughput (samples/s) per variant at the largest batch size of each hardware·model."""
    path, ok = Path(path), _ok(runs)
    if ok.empty:
        return _no_data(path, "Throughput at the largest batch size")
    largest = ok.groupby("setup")["batch_size"].transform("max")
    fig, panels = _panels(ok[ok["batch_size"] == largest], per_batch=False)
    for ax, sub, title in panels:
        _barh(ax, sub, sub["samples_per_s"].to_numpy(float), color=sns.color_palette()[2])
        ax.set_xlabel("throughput, samples/s")
        ax.set_title(f"{title}\nbatch size {int(sub['batch_size'].max())}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def pareto_front(lat, mem) -> np.ndarray:
    """Boolean mask of points not dominated in (latency, memory), both to be minimised."""
    lat, mem = np.asarray(lat, float), np.asarray(mem, float)
    front = np.ones(len(lat), bool)
    for i in range(len(lat)):
        dominated = (lat <= lat[i]) & (mem <= mem[i]) & ((lat < lat[i]) | (mem < mem[i]))
        front[i] = not dominated.any()
    return front


def pareto_figure(runs: pd.DataFrame, path, fidelity_df: pd.DataFrame | None = None) -> Path:
    """Latency vs peak memory per batch size; the Pareto front (nothing faster and smaller) is joined and marked.

    With `fidelity_df`, variants outside the fidelity tolerance are drawn with an × marker.
    """
    path, ok = Path(path), _ok(runs)
    if ok.empty:
        return _no_data(path, "Latency vs memory (Pareto view)")
    outside = set()
    if fidelity_df is not None and len(fidelity_df):
        bad = fidelity_df[fidelity_df["within_tolerance"] == False]  # noqa: E712
        outside = set(zip(bad["hardware"], bad["model"], bad["variant"]))
    fig, panels = _panels(ok, row_height=3.4)
    for ax, sub, title in panels:
        if sub.empty:
            ax.set_axis_off()
            continue
        x, y = sub["latency_median"].to_numpy(float), sub["peak_memory_mb"].to_numpy(float)
        front = pareto_front(x, y)
        for k, r in enumerate(sub.itertuples()):
            out = (r.hardware, r.model, r.variant) in outside
            ax.scatter(x[k], y[k], s=60 if front[k] else 30, marker="x" if out else "o",
                       color="C3" if front[k] else "0.5", zorder=3)
            ax.annotate(r.variant, (x[k], y[k]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        idx = np.argsort(x[front])
        ax.step(x[front][idx], y[front][idx], where="post", color="C3", lw=1, label="Pareto front")
        ax.set_xlabel("latency, s (median)")
        ax.set_ylabel("peak memory, MB")
        ax.set_title(title, fontsize=9)
        ax.margins(0.12)  # room for the labels beside the points
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def stages_figure(runs: pd.DataFrame, path) -> Path:
    """Stacked bars of median time per stage (semantic, coarse, fine, decode) per variant."""
    path, ok = Path(path), _ok(runs)
    cols = [f"stage_{s}_s" for s in STAGES]
    ok = ok.dropna(subset=cols, how="all")
    if ok.empty:
        return _no_data(path, "Time per stage")
    fig, panels = _panels(ok)
    colors = sns.color_palette("deep", len(STAGES))
    for ax, sub, title in panels:
        if sub.empty:
            ax.set_axis_off()
            continue
        left = np.zeros(len(sub))
        y = np.arange(len(sub))
        for st, col, c in zip(STAGES, cols, colors):
            vals = sub[col].fillna(0).to_numpy(float)
            ax.barh(y, vals, left=left, color=c, label=st)
            left += vals
        ax.set_yticks(y, sub["variant"])
        ax.invert_yaxis()
        ax.set_xlabel("median time per stage, s")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def lengths_figure(runs: pd.DataFrame, path) -> Path:
    """Distribution of generated semantic lengths per variant (only meaningful with natural length mode)."""
    path, ok = Path(path), _ok(runs)
    ok = ok[ok["length_mode"] == "natural"]
    rows = [{"setup": r["setup"], "variant": r["variant"], "batch size": r["batch_size"], "semantic tokens": v}
            for _, r in ok.iterrows() for v in json_list(r, "semantic_lengths")]
    if not rows:
        return _no_data(path, "Generated semantic lengths", "no data: length mode is not natural")
    long = pd.DataFrame(rows)
    setups = sorted(long["setup"].unique())
    fig, axes = plt.subplots(len(setups), 1, squeeze=False,
                             figsize=(7, (1.2 + 0.4 * long["variant"].nunique()) * len(setups) + 0.6))
    for ax, setup in zip(axes[:, 0], setups):
        sub = long[long["setup"] == setup]
        order = variant_order(sub["variant"], _baseline(sub))
        sns.stripplot(data=sub, x="semantic tokens", y="variant", hue="batch size", order=order, ax=ax,
                      dodge=True, alpha=0.7, palette="deep")
        ax.set_title(setup, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


@dataclass(frozen=True)
class Figure:
    draw: Callable  # (runs, path, fidelity) -> path
    caption: str


FIGURES: dict[str, Figure] = {
    "latency": Figure(lambda r, p, f: latency_figure(r, p),
                      "Latency of one generate call per variant (geometric mean over the cell's processes), one "
                      "panel per batch size. Error bars: its interval at the level stated in the absolute table "
                      "(t interval on the run's pooled between-process variance); hatched bars show the range "
                      "min–max of the calls instead (no cell of the run had two processes)."),
    "memory": Figure(lambda r, p, f: memory_figure(r, p),
                     "Peak memory per variant (CUDA peak allocated memory on GPU; on CPU the peak anonymous RSS: the "
                     "process's own resident memory, weights copied out of the memory-mapped checkpoint first)."),
    "throughput": Figure(lambda r, p, f: throughput_figure(r, p),
                         "Throughput in samples per second at the largest batch size."),
    "pareto": Figure(pareto_figure, "Latency against peak memory; red points joined by the line form the Pareto front "
                                    "(no other variant is both faster and smaller); × marks a variant outside its "
                                    "fidelity tolerance."),
    "stages": Figure(lambda r, p, f: stages_figure(r, p),
                     "Median time spent in each stage (semantic, coarse, fine, decode) per variant."),
    "lengths": Figure(lambda r, p, f: lengths_figure(r, p),
                      "Distribution of the generated semantic lengths per variant (natural length mode only)."),
}


def figures_markdown(names) -> str:
    parts = [f"![{FIGURES[n].caption}](figures/{n}.png){{#fig-{n}}}\n" for n in names]
    return "\n".join(parts)


def make_figures(runs, out_dir, fidelity=None) -> list[Path]:
    """Draw every registered figure into `out_dir/<name>.png` and write `out_dir/figures.md`.

    `runs` and `fidelity` are the runs and fidelity tables (DataFrames or paths of their CSV files).
    """
    runs = runs if isinstance(runs, pd.DataFrame) else read_csv(runs)
    if fidelity is not None and not isinstance(fidelity, pd.DataFrame):
        fidelity = read_csv(fidelity)
    out = Path(out_dir)
    sns.set_theme(style="whitegrid", context="notebook")
    paths = [FIGURES[name].draw(runs, out / f"{name}.png", fidelity) for name in FIGURES]
    write_atomic(out / "figures.md", figures_markdown(FIGURES).encode("utf-8"))
    return paths
