"""Collect run JSONs into tidy tables (runs, absolute, relative) and write them as CSV and Markdown."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from barkbench.results import slug, write_atomic
from barkbench.stats import relative_change, summarize

BASELINE = "eager"
STAGES = ("semantic", "coarse", "fine", "decode")
MB = 1e6  # 1 MB = 10^6 bytes (as in the 2023 study's GB → MB conversion)
MINUS = "\u2212"


# ---------------------------------------------------------------- small helpers

model_slug = slug


SPECIAL_DIRS = ("fidelity", "repro", "overhead")


def find_run_jsons(results_dir) -> list[Path]:
    """Run JSONs under `results/<hardware>/<model>/<variant>/bs<N>.json` (not fidelity/, repro/ nor overhead/)."""
    return sorted(p for p in Path(results_dir).glob("*/*/*/bs*.json") if p.parent.name not in SPECIAL_DIRS)


def find_inputs(results_dir) -> dict[str, list[Path]]:
    """Everything the report reads from the results layout: runs, fidelity, repro and overhead JSONs."""
    r = Path(results_dir)
    return {"runs": find_run_jsons(r), "fidelity": sorted(r.glob("*/*/fidelity/*.json")),
            "repro": sorted(r.glob("*/*/repro/*/rep*.json")), "overhead": sorted(r.glob("*/*/overhead/*/bs*.json"))}


def atomic_write_text(path, text: str) -> Path:
    write_atomic(path, text.encode("utf-8"))
    return Path(path)


def _isnum(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and not pd.isna(x)


def fmt_num(x, digits: int = 2) -> str:
    return f"{float(x):.{digits}f}" if _isnum(x) else ""


def fmt_pct(x, digits: int = 1) -> str:
    """Signed percent with a typographic minus, e.g. `−27.0 %`; empty for missing values."""
    if not _isnum(x):
        return ""
    if float(x) == 0:
        return "0 %"
    return f"{float(x):+.{digits}f} %".replace("-", MINUS)


def md_escape(text) -> str:
    """Escape Markdown-active characters in free text taken from data (names, reasons)."""
    if not _isnum(text) and not isinstance(text, str):
        return ""
    s = " ".join(str(text).split())
    for ch in "\\`*_[]<>$@#~^":  # `|` is escaped by to_pipe_table
        s = s.replace(ch, "\\" + ch)
    return s


def to_pipe_table(df: pd.DataFrame) -> str:
    """Pipe table (pandoc/GFM) from a DataFrame whose cells are already formatted; no dependency on tabulate."""
    if df.empty:
        return "_(no rows)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = ["" if (not isinstance(v, str) and pd.isna(v)) else " ".join(str(v).split()).replace("|", "\\|") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def variant_order(variants) -> list[str]:
    """Baseline first, then alphabetical."""
    uniq = sorted(set(variants))
    return ([BASELINE] if BASELINE in uniq else []) + [v for v in uniq if v != BASELINE]


# ---------------------------------------------------------------- runs

def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def _median(xs):
    xs = [x for x in (xs or []) if x is not None]
    return float(np.median(xs)) if xs else np.nan


def run_row(data: dict, path=None) -> dict:
    """One tidy row from a parsed run JSON."""
    proto = data.get("protocol") or {}
    variant = data.get("variant") or {}
    opts = variant.get("optimizations")
    if opts is None:
        opts = [o for o in str(variant.get("name", "")).split("+") if o and o != BASELINE]
    device = _get(data, "device", "type", default="")
    it = data.get("iterations") or {}
    lat = [float(x) for x in (it.get("latency_s") or [])]
    summ = _get(data, "summary", "latency_s") or (summarize(lat) if lat else {})
    mem = data.get("memory") or {}
    rss, cuda = mem.get("peak_rss_bytes"), mem.get("cuda_peak_allocated_bytes")
    if device == "cuda" and cuda is not None:
        peak, kind = cuda, "cuda_peak_allocated"
    else:
        anon = mem.get("peak_anon_rss_bytes")
        peak, kind = (anon, "peak_anon_rss") if anon is not None else (rss, "peak_rss" if rss is not None else None)
    thr = data.get("throughput") or {}
    timing = data.get("timing") or {}
    sem = [int(x) for x in (it.get("semantic_tokens") or [])]
    wav = _get(data, "audio", "wav")
    if wav and path is not None:
        wav = str((Path(path).parent / wav))
    row = {
        "hardware": _get(data, "hardware", "id", default=""),
        "model": _get(data, "model", "requested", default=""),
        "model_id": _get(data, "model", "id"),
        "weights": _get(data, "model", "weights"),
        "architecture": _get(data, "model", "architecture"),
        "variant": variant.get("name", ""),
        "optimizations": "+".join(opts),
        "batch_size": int(proto.get("batch_size") or 0),
        "status": data.get("status", ""),
        "reason": data.get("reason"),
        "device": device,
        "length_mode": proto.get("length_mode"),
        "max_new_tokens": proto.get("max_new_tokens"),
        "warmup": proto.get("warmup"),
        "instrumented": data.get("instrumented", True),
        "n": summ.get("n", len(lat)) if lat or summ else 0,
    }
    for key in ("median", "mean", "std", "cv", "p10", "p90", "ci95_low", "ci95_high"):
        row[f"latency_{key}"] = summ.get(key, np.nan)
    row.update({
        "memory_kind": kind,
        "peak_memory_mb": peak / MB if peak is not None else np.nan,
        "peak_rss_bytes": rss,
        "cuda_peak_allocated_bytes": cuda,
        "weights_mb": (mem.get("weights_bytes") or _get(data, "model", "weights_bytes") or np.nan) / MB,
        "samples_per_s": thr.get("samples_per_s", np.nan),
        "audio_s_per_s": thr.get("audio_s_per_s", np.nan),
        "rtf": thr.get("rtf", np.nan),
        "audio_s_mean": float(np.mean(it["audio_s"])) if it.get("audio_s") else np.nan,
    })
    stages = it.get("stages") or {}
    for st in STAGES:
        row[f"stage_{st}_s"] = _median(_get(stages, st, "seconds"))
        row[f"stage_{st}_tokens"] = _median(_get(stages, st, "tokens"))
    row.update({
        "semantic_len_min": min(sem) if sem else np.nan,
        "semantic_len_median": float(np.median(sem)) if sem else np.nan,
        "semantic_len_max": max(sem) if sem else np.nan,
        "load_s": timing.get("load_s", np.nan),
        "compile_s": timing.get("compile_s", np.nan),
        "stage_timer_overhead_s": timing.get("stage_timer_overhead_s", np.nan),
        "wav": wav,
        "latency_s": json.dumps(lat),  # per-iteration values, JSON-encoded so the CSV round-trips
        "semantic_lengths": json.dumps(sem),
        "path": str(path) if path is not None else None,
    })
    return row


def load_runs(paths) -> pd.DataFrame:
    """One row per run JSON; sorted by hardware, model, batch size, variant (baseline first)."""
    rows = []
    for p in paths:
        with open(p, encoding="utf-8") as fh:
            rows.append(run_row(json.load(fh), p))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    order = {v: i for i, v in enumerate(variant_order(df["variant"]))}
    df = df.assign(_o=df["variant"].map(order)).sort_values(["hardware", "model", "batch_size", "_o"])
    return df.drop(columns="_o").reset_index(drop=True)


def read_runs_csv(path) -> pd.DataFrame:
    return pd.read_csv(path)


def json_list(row, column: str = "latency_s") -> list:
    """A JSON-encoded per-iteration list of a runs-table row (`latency_s` or `semantic_lengths`)."""
    val = row[column]
    return json.loads(val) if isinstance(val, str) and val else []


def latencies(row) -> list[float]:
    """Per-iteration latencies of a runs-table row."""
    return [float(x) for x in json_list(row, "latency_s")]


def load_fidelity(paths) -> pd.DataFrame:
    """One row per `results/<hardware>/<model>/fidelity/<variant>.json`; hardware and model come from the path."""
    rows = []
    for p in map(Path, paths):
        with open(p, encoding="utf-8") as fh:
            d = json.load(fh)
        row = {"hardware": p.parents[2].name, "model_slug": p.parents[1].name, "variant": d.get("variant", p.stem),
               "baseline": d.get("baseline"), "status": d.get("status"), "reason": d.get("reason"),
               "within_tolerance": d.get("within_tolerance"), "violations": "; ".join(d.get("violations") or []),
               "waveform_snr_db": d.get("waveform_snr_db"), "tolerance": json.dumps(d.get("tolerance") or {})}
        for stage in ("semantic", "coarse", "fine"):
            lg = (d.get("logits") or {}).get(stage) or {}
            row[f"{stage}_max_abs"], row[f"{stage}_max_rel"] = lg.get("max_abs"), lg.get("max_rel")
            row[f"{stage}_agreement"] = ((d.get("tokens") or {}).get(stage) or {}).get("agreement")
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- tables

GROUP = ["hardware", "model", "batch_size"]


def absolute_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Absolute numbers per (hardware, model, batch size, variant); non-ok rows kept with empty numbers."""
    cols = GROUP + ["variant", "status", "reason", "n", "latency_median", "latency_ci95_low", "latency_ci95_high",
                    "latency_cv", "peak_memory_mb", "memory_kind", "samples_per_s", "rtf", "compile_s"]
    out = runs[cols].copy()
    bad = out["status"] != "ok"
    num = ["n", "latency_median", "latency_ci95_low", "latency_ci95_high", "latency_cv", "peak_memory_mb",
           "samples_per_s", "rtf", "compile_s"]
    out[num] = out[num].astype(float)
    out.loc[bad, num] = np.nan
    out["n"] = out["n"].astype("Int64")
    return out.rename(columns={"latency_median": "latency_median_s", "latency_ci95_low": "latency_ci95_low_s",
                               "latency_ci95_high": "latency_ci95_high_s"}).reset_index(drop=True)


def relative_table(runs: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """% change vs the baseline variant of the same hardware/model/batch size.

    Latency: change of the median with a bootstrap 95 % CI (`stats.relative_change`); `within_noise` when the
    CI contains 0. Memory and throughput: plain ratio of the point values. The baseline row shows 0.
    """
    rows = []
    for _, grp in runs.groupby(GROUP, sort=False):
        base = grp[(grp["variant"] == baseline) & (grp["status"] == "ok")]
        base = base.iloc[0] if len(base) else None
        for _, r in grp.iterrows():
            row = {k: r[k] for k in GROUP + ["variant", "status", "reason"]}
            row.update(latency_change_pct=np.nan, latency_change_ci95_low_pct=np.nan,
                       latency_change_ci95_high_pct=np.nan, within_noise=None, memory_change_pct=np.nan,
                       throughput_change_pct=np.nan, speedup=np.nan, note="")
            if r["status"] != "ok":
                row["note"] = r["status"]
            elif base is None:
                row["note"] = f"no ok {baseline} run"
            elif r["variant"] == baseline:
                row.update(latency_change_pct=0.0, latency_change_ci95_low_pct=0.0, latency_change_ci95_high_pct=0.0,
                           memory_change_pct=0.0, throughput_change_pct=0.0, speedup=1.0, note="baseline")
            else:
                rc = relative_change(latencies(base), latencies(r))
                row.update(latency_change_pct=100 * rc["change"], latency_change_ci95_low_pct=100 * rc["ci95_low"],
                           latency_change_ci95_high_pct=100 * rc["ci95_high"], within_noise=rc["within_noise"],
                           memory_change_pct=100 * (r["peak_memory_mb"] / base["peak_memory_mb"] - 1),
                           throughput_change_pct=100 * (r["samples_per_s"] / base["samples_per_s"] - 1),
                           speedup=base["latency_median"] / r["latency_median"])
            rows.append(row)
    return pd.DataFrame(rows)


def _status_cell(status, reason) -> str:
    return "ok" if status == "ok" else f"{status}: {reason}" if isinstance(reason, str) and reason else str(status)


def absolute_markdown_df(abs_df: pd.DataFrame) -> pd.DataFrame:
    """Formatted cells for one group of the absolute table."""
    lat = [f"{fmt_num(m)} [{fmt_num(lo)}, {fmt_num(hi)}]" if _isnum(m) else ""
           for m, lo, hi in zip(abs_df["latency_median_s"], abs_df["latency_ci95_low_s"], abs_df["latency_ci95_high_s"])]
    return pd.DataFrame({
        "batch size": abs_df["batch_size"].astype(int).astype(str),
        "variant": abs_df["variant"].map(md_escape),
        "status": [md_escape(_status_cell(s, r)) for s, r in zip(abs_df["status"], abs_df["reason"])],
        "n": [str(int(x)) if _isnum(x) else "" for x in abs_df["n"]],
        "latency s, median [95 % CI]": lat,
        "CV": abs_df["latency_cv"].map(lambda x: f"{100 * x:.1f} %" if _isnum(x) else ""),
        "peak memory MB": abs_df["peak_memory_mb"].map(lambda x: fmt_num(x, 0)),
        "throughput samples/s": abs_df["samples_per_s"].map(lambda x: fmt_num(x, 3)),
        "RTF": abs_df["rtf"].map(lambda x: fmt_num(x, 2)),
        "compile s": abs_df["compile_s"].map(lambda x: fmt_num(x, 1) if _isnum(x) else ""),
    })


def relative_markdown_df(rel_df: pd.DataFrame) -> pd.DataFrame:
    """Formatted cells for one group of the relative table ("latency −27.0 % [−30.1 %, −24.2 %]")."""
    lat = [f"{fmt_pct(c)} [{fmt_pct(lo)}, {fmt_pct(hi)}]" if _isnum(c) and n != "baseline" else fmt_pct(c)
           for c, lo, hi, n in zip(rel_df["latency_change_pct"], rel_df["latency_change_ci95_low_pct"],
                                   rel_df["latency_change_ci95_high_pct"], rel_df["note"])]
    noise = ["" if w is None or (isinstance(w, float) and math.isnan(w)) else ("yes" if bool(w) else "no")
             for w in rel_df["within_noise"]]
    note = [md_escape(_status_cell(s, r)) if s != "ok" else md_escape(n)
            for s, r, n in zip(rel_df["status"], rel_df["reason"], rel_df["note"])]
    return pd.DataFrame({
        "batch size": rel_df["batch_size"].astype(int).astype(str),
        "variant": rel_df["variant"].map(md_escape),
        "latency change [95 % CI]": lat,
        "speed-up": rel_df["speedup"].map(lambda x: f"{fmt_num(x)}×" if _isnum(x) else ""),
        "within noise": noise,
        "peak memory change": rel_df["memory_change_pct"].map(fmt_pct),
        "throughput change": rel_df["throughput_change_pct"].map(fmt_pct),
        "note": note,
    })


def tables_markdown(df: pd.DataFrame, formatter, title: str, heading: str = "###") -> str:
    """One pipe table per (hardware, model), each under a heading."""
    parts = []
    for (hw, model), grp in df.groupby(["hardware", "model"], sort=False):
        parts.append(f"{heading} {title}: {md_escape(hw)} · {md_escape(model)}\n\n{to_pipe_table(formatter(grp))}")
    return "\n".join(parts) if parts else "_(no runs)_\n"


def aggregate(run_paths, out_dir) -> dict[str, Path]:
    """Load run JSONs and write runs.csv, absolute.csv/.md, relative.csv/.md into `out_dir` (atomically).

    Returns {"runs": path, "absolute_csv": ..., "absolute_md": ..., "relative_csv": ..., "relative_md": ...}.
    """
    out = Path(out_dir)
    runs = load_runs(run_paths)
    if runs.empty:
        raise ValueError("no run JSONs given")
    absolute, relative = absolute_table(runs), relative_table(runs)
    written = {
        "runs": atomic_write_text(out / "runs.csv", runs.to_csv(index=False)),
        "absolute_csv": atomic_write_text(out / "absolute.csv", absolute.to_csv(index=False)),
        "absolute_md": atomic_write_text(out / "absolute.md", tables_markdown(
            absolute, absolute_markdown_df, "Absolute results", heading="##")),
        "relative_csv": atomic_write_text(out / "relative.csv", relative.to_csv(index=False)),
        "relative_md": atomic_write_text(out / "relative.md", tables_markdown(
            relative, relative_markdown_df, f"Change vs {BASELINE}", heading="##")),
    }
    return written
