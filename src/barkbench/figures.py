"""Figures from the runs table (PNG, ~110 dpi). Every figure file is always written, with a "no data" note if empty."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from barkbench.aggregate import STAGES, json_list, load_fidelity, model_slug, read_runs_csv, variant_order  # noqa: E402

DPI = 110
FIGURES = ("latency.png", "memory.png", "throughput.png", "pareto.png", "stages.png", "lengths.png")


def _save(fig, path: Path) -> Path:
    """Save atomically (temp file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _no_data(path: Path, title: str, note: str = "no data") -> Path:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=12, color="0.4", transform=ax.transAxes)
    return _save(fig, path)


def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs[runs["status"] == "ok"].copy()
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
            order = variant_order(sub["variant"])
            sub = sub.set_index("variant").loc[order].reset_index() if len(sub) else sub
            panels.append((axes[i][j], sub, title))
    return fig, panels


def _barh(ax, sub, values, xerr=None, color=None):
    y = np.arange(len(sub))
    ax.barh(y, values, xerr=xerr, color=color or sns.color_palette()[0], capsize=3)
    ax.set_yticks(y, sub["variant"])
    ax.invert_yaxis()


def latency_figure(runs: pd.DataFrame, path) -> Path:
    """Median latency per variant with bootstrap 95 % CI error bars, one panel per batch size."""
    path, ok = Path(path), _ok(runs)
    if ok.empty:
        return _no_data(path, "Latency per variant")
    fig, panels = _panels(ok)
    for ax, sub, title in panels:
        if sub.empty:
            ax.set_axis_off()
            continue
        med = sub["latency_median"].to_numpy(float)
        err = np.vstack([med - sub["latency_ci95_low"].to_numpy(float), sub["latency_ci95_high"].to_numpy(float) - med])
        _barh(ax, sub, med, xerr=np.clip(err, 0, None))
        ax.set_xlabel("latency per generate call, s (median, 95 % CI)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def memory_figure(runs: pd.DataFrame, path) -> Path:
    """Peak memory per variant (CUDA peak allocated on GPU, peak RSS on CPU), one panel per batch size."""
    path, ok = Path(path), _ok(runs)
    if ok.empty:
        return _no_data(path, "Peak memory per variant")
    fig, panels = _panels(ok)
    for ax, sub, title in panels:
        if sub.empty:
            ax.set_axis_off()
            continue
        _barh(ax, sub, sub["peak_memory_mb"].to_numpy(float), color=sns.color_palette()[1])
        kinds = ", ".join(sorted(str(k).replace("_", " ") for k in sub["memory_kind"].dropna().unique()))
        ax.set_xlabel(f"peak memory, MB ({kinds})")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


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
        outside = set(zip(bad["hardware"], bad["model_slug"], bad["variant"]))
    fig, panels = _panels(ok, row_height=3.4)
    for ax, sub, title in panels:
        if sub.empty:
            ax.set_axis_off()
            continue
        x, y = sub["latency_median"].to_numpy(float), sub["peak_memory_mb"].to_numpy(float)
        front = pareto_front(x, y)
        for k, r in enumerate(sub.itertuples()):
            out = (r.hardware, model_slug(r.model), r.variant) in outside
            ax.scatter(x[k], y[k], s=60 if front[k] else 30, marker="x" if out else "o",
                       color="C3" if front[k] else "0.5", zorder=3)
            ax.annotate(r.variant, (x[k], y[k]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        idx = np.argsort(x[front])
        ax.step(x[front][idx], y[front][idx], where="post", color="C3", lw=1, label="Pareto front")
        ax.set_xlabel("latency, s (median)")
        ax.set_ylabel("peak memory, MB")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
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
        order = variant_order(sub["variant"])
        sns.stripplot(data=sub, x="semantic tokens", y="variant", hue="batch size", order=order, ax=ax,
                      dodge=True, alpha=0.7, palette="deep")
        ax.set_title(setup, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def make_figures(runs, out_dir, fidelity_df=None) -> list[Path]:
    """Write latency, memory, throughput, pareto, stages and lengths PNGs into `out_dir`.

    `runs` is the runs table (DataFrame from `aggregate.load_runs`) or a path to `runs.csv`; `fidelity_df` is
    None, a DataFrame from `aggregate.load_fidelity`, or a list of fidelity JSON paths (may be empty).
    Only ok runs are plotted. Returns the six paths (always all six, in `FIGURES` order).
    """
    df = runs if isinstance(runs, pd.DataFrame) else read_runs_csv(runs)
    if fidelity_df is not None and not isinstance(fidelity_df, pd.DataFrame):
        fidelity_df = load_fidelity(fidelity_df) if len(fidelity_df) else None
    out = Path(out_dir)
    sns.set_theme(style="whitegrid", context="notebook")
    return [
        latency_figure(df, out / "latency.png"),
        memory_figure(df, out / "memory.png"),
        throughput_figure(df, out / "throughput.png"),
        pareto_figure(df, out / "pareto.png", fidelity_df),
        stages_figure(df, out / "stages.png"),
        lengths_figure(df, out / "lengths.png"),
    ]
