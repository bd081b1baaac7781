"""The report's text: Markdown fragments laid out from the tables (`barkbench.tables`) and the records'
metadata. Nothing here computes a statistic; `report/report.qmd` includes these files."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from .calibration import GEMM_FORMATS
from .markdown import callout, fmt_num, fmt_pct, isnum, md_escape, to_pipe_table
from .provenance import CPU_FEATURES  # the instruction-set extensions that decide the fastest CPU variant
from .records import FAULT_BUDGET_SPENT
from .study2023 import PUBLISHED_BASELINE, PUBLISHED_TO_OURS, STUDY
from .tables import CONTROL, STAGES

INTERVALS = ("**Intervals.** The process is the unit of replication: every cell (variant × batch size) is "
             "measured in several fresh processes, in interleaved rounds (round *k* runs every cell's *k*-th "
             "process, in a seeded random order), and the baseline once more as its own cell, the A/A control. "
             "Model: log latency = cell + round + process effect + call noise; the process effect has one "
             "variance for all cells of a run (estimated from the processes of all cells together, rounds taken "
             "out), the call noise each cell's own (from the spread of calls within its processes: a long eager "
             "call on a CPU varies far more than a short bf16 one). Latency of a cell: geometric mean over its "
             "processes with its t interval; change vs the baseline: ratio of the geometric means with its t "
             "interval, degrees of freedom by Satterthwaite (the *noise* table below checks the model cell by "
             "cell). Each interval states its level and degrees of freedom: it holds that level under the model, "
             "and the simulation in `tests/test_stats.py` (per-call noise of 6 % in the baseline and control, 1 % "
             "elsewhere, process-to-process spread 0–5 %, slow drift, 2 processes × 2 calls) checks that the "
             "achieved rate of false \"outside noise\" verdicts and the coverage stay within 2 points of it; with "
             "one per-call noise for all cells and no process spread the interval is conservative (about 1 % false "
             "\"outside noise\" at a stated 5 %). "
             "*n* is written calls × processes.")


# ---------------------------------------------------------------- cells

def level_text(level, df) -> str:
    """The level an interval is stated at, with its degrees of freedom, e.g. `95 %, t 10 df`."""
    return f"{100 * float(level):.3g} %, t {float(df):.1f} df" if isnum(level) and isnum(df) else ""


def latency_cell(gmean, low, high, level=None, df=None) -> str:
    if not isnum(gmean):
        return ""
    if isnum(low):
        return f"{fmt_num(gmean)} [{fmt_num(low)}, {fmt_num(high)}] ({level_text(level, df)})"
    return f"{fmt_num(gmean)} (no interval: one process)"


def change_cell(r) -> str:
    c = r.get("latency_change_pct")
    if r.get("note") == "too_slow" and isnum(r.get("slowdown")):
        k = int(r["calls_made"])
        made = f"{k} timed call{'s' if k != 1 else ''}" if k else "its warm-up call only"
        return f"≈ {fmt_num(r['slowdown'], 1)}× slower ({made}; stopped early: too slow for its time limit)"
    if not isnum(c) or r.get("note") == "baseline":
        return fmt_pct(c)
    if isnum(r.get("ci_low_pct")):
        return (f"{fmt_pct(c)} [{fmt_pct(r['ci_low_pct'])}, {fmt_pct(r['ci_high_pct'])}] "
                f"({level_text(r.get('ci_level'), r.get('ci_df'))})")
    return f"{fmt_pct(c)} (no interval: no cell has two processes)"


def n_cell(r) -> str:
    """calls × processes of both sides of a comparison."""
    a, b = r.get("n_baseline"), r.get("n_variant")
    return f"{a} vs {b}" if isinstance(a, str) and isinstance(b, str) else ""


def noise_cell(w, change=None) -> str:
    if w is None or (isinstance(w, float) and math.isnan(w)):
        return "undecided (one process per cell)" if isnum(change) and change != 0 else ""
    return "yes" if bool(w) else "no"


def _status(status, reason) -> str:
    return "ok" if status == "ok" else f"{status}: {reason}" if isinstance(reason, str) and reason else str(status)


def _setups(df):
    return df.groupby(["hardware", "model"], sort=False)


# ---------------------------------------------------------------- sections

def absolute_cells(g: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "batch size": g["batch_size"].astype(int).astype(str),
        "variant": g["variant"].map(md_escape),
        "status": [md_escape(_status(s, r)) for s, r in zip(g["status"], g["reason"])],
        "calls × processes": [md_escape(x) if s == "ok" else "" for x, s in zip(g["calls_x_processes"], g["status"])],
        "latency s, geometric mean [interval]": [latency_cell(*v) for v in zip(
            g["latency_gmean"], g["latency_ci_low"], g["latency_ci_high"], g["latency_ci_level"], g["latency_ci_df"])],
        "median of calls s": g["latency_median"].map(fmt_num),
        "CV of calls": g["latency_cv"].map(lambda x: f"{100 * x:.1f} %" if isnum(x) else ""),
        "peak memory MB": g["peak_memory_mb"].map(lambda x: fmt_num(x, 0)),
        "samples/s": g["samples_per_s"].map(lambda x: fmt_num(x, 3)),
        "RTF": g["rtf"].map(fmt_num),
        "first-call overhead s": g["first_call_overhead_s"].map(lambda x: fmt_num(x, 1)),
        "compile s (first process)": g["compile_s"].map(lambda x: fmt_num(x, 1)),
        "stopped by": g["stopped_by"].map(lambda x: md_escape(x) if isinstance(x, str) else ""),
        **energy_and_graph_cells(g),
        "missing processes": g["process_notes"].map(lambda x: md_escape(x) if isinstance(x, str) else ""),
    })


def energy_and_graph_cells(g: pd.DataFrame) -> dict:
    """Energy per sample and per second of audio, and for compiled runs what torch.compile did (CUDA graph
    replays per call, graph skips, recompiles during the timed calls); old tables without them: none."""
    cells = {}
    if "joules_per_sample" in g:
        cells["J/sample"] = g["joules_per_sample"].map(lambda x: fmt_num(x, 3))
        cells["J/audio s"] = g["joules_per_audio_s"].map(lambda x: fmt_num(x, 3))
    if "cuda_graph_replays_per_call" in g and g["cuda_graph_replays_per_call"].map(isnum).any():
        cells["compiled: graph replays/call, skips, recompiles"] = [
            f"{fmt_num(r, 1)}, {int(k)}, {int(c)}" if isnum(r) else ""
            for r, k, c in zip(g["cuda_graph_replays_per_call"], g["cuda_graph_skips"], g["recompiles_timed"])]
    return cells


def energy_and_graph_notes(g: pd.DataFrame) -> str:
    """Below a machine's table: where no energy counter exists, and each CUDA graph skip's reason."""
    notes = []
    if "energy_counter" in g:
        ok = g[g["status"] == "ok"]
        if len(ok) and ok["energy_counter"].isna().all():
            notes.append("Energy: no energy counter on this machine.")
        for s in ok["energy_counter"].dropna().unique():
            notes.append(f"Energy counter: {md_escape(s)} ({'the GPU board' if s == 'nvml' else 'the CPU packages, all processes on them'}), "
                         "read before and after each timed call.")
    if "cuda_graph_skip_reasons" in g:
        for variant, bs, reasons in zip(g["variant"], g["batch_size"], g["cuda_graph_skip_reasons"]):
            for reason in json.loads(reasons) if isinstance(reasons, str) and reasons else []:
                notes.append(f"CUDA graphs skipped in {md_escape(variant)} at batch size {int(bs)}: "
                             f"{md_escape(reason.splitlines()[0][:200])}")
    return "".join(f"- {n}\n" for n in notes) + ("\n" if notes else "")


def relative_cells(g: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "batch size": g["batch_size"].astype(int).astype(str),
        "variant": g["variant"].map(md_escape),
        "calls × processes (baseline vs variant)": [n_cell(r) for r in g.to_dict("records")],
        "latency change [interval]": [change_cell(r) for r in g.to_dict("records")],
        "speed-up": g["speedup"].map(lambda x: f"{fmt_num(x)}×" if isnum(x) else ""),
        "within noise": [noise_cell(w, c) for w, c in zip(g["within_noise"], g["latency_change_pct"])],
        "peak memory change": g["memory_change_pct"].map(fmt_pct),
        "throughput change": g["throughput_change_pct"].map(fmt_pct),
        "note": [md_escape(_status(s, r)) if s != "ok" else md_escape(n)
                 for s, r, n in zip(g["status"], g["reason"], g["note"])],
    })


def noise_cells(g: pd.DataFrame) -> pd.DataFrame:
    sd = (lambda x: f"{x:.2f} %" if isnum(x) else "–")
    return pd.DataFrame({
        "batch size": g["batch_size"].astype(int).astype(str), "variant": g["variant"].map(md_escape),
        "calls × processes": g["calls_x_processes"].map(md_escape),
        "spread of its processes (sd)": g["cell_sd_pct"].map(sd), "the model's (sd)": g["model_sd_pct"].map(sd),
        "per call (sd)": g["per_call_sd_pct"].map(sd),
        "p (spread this large)": g["spread_p"].map(lambda x: f"{x:.3g}" if isnum(x) else "–"),
    })


def noise_md(noise: pd.DataFrame) -> str:
    """The check of the noise model: each cell's spread of process means beside the model's."""
    parts = []
    for hw, g in noise.groupby("hardware", sort=False):
        first = g.iloc[0]
        high = g[g["spread_p"] < 0.01]["variant"].tolist()
        verdict = (f" **Spread beyond the model (p < 0.01): {', '.join(map(md_escape, high))}**: their intervals are "
                   "too narrow." if high else " No cell spreads beyond the model (p < 0.01).")
        parts.append(f"**Noise check, {md_escape(hw)}**: a process's mean log latency varies by the run's "
                     f"between-process sd {fmt_num(first['between_sd_pct'])} % (from residuals on {int(first['df'])} df, "
                     f"rounds taken out; round effects {md_escape(first['round_effects_pct'])} %) plus its cell's "
                     f"per-call variance over its calls.{verdict}\n\n{to_pipe_table(noise_cells(g))}")
    return "\n".join(parts)


def tables_md(absolute: pd.DataFrame, relative: pd.DataFrame, noise: pd.DataFrame | None = None) -> str:
    """Absolute and relative tables per hardware and model; variants not applicable there are listed once,
    in the callout above, not as empty rows."""
    parts = [INTERVALS + "\n"]
    absolute = absolute[absolute["status"] != "not_applicable"]
    relative = relative[relative["status"] != "not_applicable"]
    for (hw, model), g in _setups(absolute):
        r = relative[(relative["hardware"] == hw) & (relative["model"] == model)]
        base = md_escape(r["baseline"].iloc[0]) if len(r) else ""
        parts.append(f"### {md_escape(hw)} · {md_escape(model)}\n\nAbsolute numbers:\n\n"
                     f"{to_pipe_table(absolute_cells(g))}\n{energy_and_graph_notes(g)}Change vs {base} (same hardware, model and batch size; "
                     f"like for like only; *control*: {base} measured again as its own cell, the A/A check of the "
                     f"noise model):\n\n{to_pipe_table(relative_cells(r))}")
    if noise is not None and not noise.empty:
        parts.append(noise_md(noise))
    return "\n".join(parts)


def cross_hardware_md(cross: pd.DataFrame) -> str:
    if cross.empty:
        return ""
    parts = ["## Across hardware\n\nAbsolute figures of each machine side by side, one table per protocol. "
             "No relative change is ever computed across hardware.\n"]
    for proto, g in cross.groupby("protocol", sort=False):
        p = json.loads(proto)
        label = ", ".join(f"{k.replace('_', ' ')} {p[k]}" for k in ("max_new_tokens", "length_mode", "warmup",
                                                                    "min_iterations", "max_iterations") if k in p)
        cells = {"model": g["model"].map(md_escape), "batch size": g["batch_size"].astype(str),
                 "variant": g["variant"].map(md_escape)}
        for col in [c for c in g.columns if "@" in c]:
            metric, hw = col.split("@", 1)
            name = {"latency_median": "latency s", "peak_memory_mb": "memory MB", "samples_per_s": "samples/s"}[metric]
            cells[f"{name} · {md_escape(hw)}"] = g[col].map(lambda x: fmt_num(x, 0 if metric == "peak_memory_mb" else 3))
        parts.append(f"Protocol: {md_escape(label)}\n\n{to_pipe_table(pd.DataFrame(cells))}")
    return "\n".join(parts)


def noise_warning_md(rel: pd.DataFrame) -> str:
    """At the top: a setup whose A/A control (the baseline measured again as its own cell) is outside noise."""
    from .tables import CONTROL

    aa = rel[(rel["variant"] == CONTROL) & (rel["within_noise"] == False)] if len(rel) else rel  # noqa: E712
    if aa.empty:
        return ""
    lines = [f"- {md_escape(r['hardware'])} · {md_escape(r['model'])}, batch size {r['batch_size']}: control vs "
             f"{md_escape(r['baseline'])} {change_cell(r)}" for r in aa.to_dict("records")]
    return callout("warning", "This run's noise model failed",
                   "The A/A control, the baseline measured again as its own cell, differs from the baseline by more "
                   "than the intervals allow. The \"within / outside noise\" verdicts of this run are unreliable.\n\n"
                   + "\n".join(lines)) + "\n"


def warning_md(runs: list, fidelity: list) -> str:
    out = []
    models = [r.model for r in runs] + [f.model for f in fidelity]
    synth = [m for m in models if m.get("weights") == "synthetic"]
    if synth:
        used = sorted({m.get("id") for m in synth})
        lines = [f"**These results were measured with SYNTHETIC weights ({', '.join(f'`{u}`' for u in used)}): "
                 "the exact architecture of the Bark checkpoint with RANDOM weights. The audio samples are noise.** "
                 "Latency (in fixed length mode every call decodes the same number of tokens), memory and "
                 "throughput are meaningful; what the model says is not. In the fidelity checks, KL divergence, "
                 "logit errors (relative), the codec-only SNR and the logit errors of batched rows against bs 1 still "
                 "measure whether a variant computes the same function; greedy token and code agreement mostly do "
                 "not, because random weights give nearly flat logits (see the baseline margins and the share of "
                 "decisive steps), and the end-to-end chain's waveform SNR does not at all: the synthetic EnCodec's "
                 "codebooks are zero, so its waveform does not depend on the codes."]
        for req, ran in sorted({(m.get("requested"), m.get("id")) for m in synth}):
            if req != ran:
                lines.append(f"- model requested `{req}`, ran `{ran}`: the hub was unreachable and nothing was cached")
        out.append(callout("warning", "Synthetic weights: audio is noise", "\n\n".join(lines)))
    commits = sorted({str(r.git_commit) for r in runs})
    versions = sorted({" ".join(f"{k}={v}" for k, v in sorted(r.versions.items()) if v) for r in runs})
    mixed = []
    if len(commits) > 1:
        mixed.append(f"- {len(commits)} git commits of barkbench: {', '.join(f'`{c}`' for c in commits)}")
    if len(versions) > 1:
        mixed.append(f"- {len(versions)} software stacks:\n" + "\n".join(f"    - `{v}`" for v in versions))
    if mixed:
        out.append(callout("important", "This report mixes software versions",
                           "The results below were not all measured with the same code and libraries. Relative "
                           "changes are only computed between runs of the same stack (see the notes).\n\n"
                           + "\n".join(mixed)))
    return "\n".join(out)


def unavailable_md(runs: pd.DataFrame) -> str:
    """Failed (or too slow) variants in a box, one line each (all batch sizes together); variants that cannot
    run on a device listed apart, in one neutral line per setup."""
    bad = runs[~runs["status"].isin(["ok", "not_applicable"])]
    out = []
    if not bad.empty:
        lines = []
        for (status, hw, model, variant, reason), g in bad.groupby(
                ["status", "hardware", "model", "variant", bad["reason"].fillna("no reason given")], sort=False):
            sizes = ", ".join(str(b) for b in sorted(g["batch_size"]))
            lines.append(f"- **{md_escape(variant)}**, batch size {sizes} ({md_escape(hw)} · {md_escape(model)}): "
                         f"{md_escape(status)}: {md_escape(reason)}")
        failed = (bad["status"] == "failed").any()
        tail = "\n\nA failed run is attempted again by the next `snakemake ... report`." if failed else ""
        out.append(callout("important", "Variants that failed or were stopped", "\n".join(lines) + tail))
    short = runs[(runs["status"] == "ok") & runs["process_notes"].fillna("").astype(bool)] \
        if "process_notes" in runs else runs.iloc[0:0]
    if len(short):
        out.append("Measured in fewer processes than declared (their intervals use the processes measured; a run "
                   "budget cuts the last rounds first): " + "; ".join(
                       f"{md_escape(r['variant'])} bs {r['batch_size']} ({md_escape(r['process_notes'])})"
                       for r in short.to_dict("records")) + ".\n")
    na = runs[runs["status"] == "not_applicable"]
    for (hw, model), g in _setups(na):
        why = g.drop_duplicates("variant")
        names = "; ".join(f"{md_escape(v)} ({md_escape(r)})" if isinstance(r, str) else md_escape(v)
                          for v, r in zip(why["variant"], why["reason"]))
        out.append(f"Not applicable on {md_escape(hw)} · {md_escape(model)}, so not measured: {names}.\n")
    return "\n".join(out)


def _cpu_features(hw: dict) -> list[str]:
    return [f for f in CPU_FEATURES if f in (hw.get("cpu_features") or [])]


def findings_md(runs: pd.DataFrame, rel: pd.DataFrame, fidelity: pd.DataFrame, hardware: dict) -> str:
    out = []
    for (hw, model), grp in _setups(rel):
        out.append(f"**{md_escape(hw)} · {md_escape(model)}**\n")
        feats = hardware.get(hw) or {}
        if feats.get("device") == "cpu":
            have = _cpu_features(feats)
            native = any(f in have for f in ("avx512_bf16", "amx_bf16"))
            out.append(f"- CPU features that decide the fastest variant: {', '.join(have) or 'none of ' + ', '.join(CPU_FEATURES)}"
                       f" ({'native bf16 matmuls' if native else 'no native bf16: bf16 is emulated and may be much slower than fp32'}).")
        for bs, g in grp.groupby("batch_size"):
            control = g[g["variant"] == CONTROL]
            if len(control) and isnum(control.iloc[0]["latency_change_pct"]):
                c = control.iloc[0]
                out.append(f"- batch size {bs}: A/A control ({md_escape(c['baseline'])} measured again as its own "
                           f"cell, {n_cell(c)}): {change_cell(c)}, "
                           f"{ {True: 'within noise', False: '**outside noise**'}.get(c['within_noise'], 'undecided')}.")
            cand = g[(g["status"] == "ok") & ~g["note"].isin(["baseline"]) & (g["variant"] != CONTROL)
                     & g["latency_change_pct"].notna()]
            if cand.empty:
                out.append(f"- batch size {bs}: no optimized variant could be compared with the baseline.")
                continue
            within = cand[cand["fidelity"] == "within"]
            if within.empty:
                out.append(f"- batch size {bs}: no headline: no compared variant has a fidelity verdict "
                           "\"within tolerance\".")
            else:
                best = within.loc[within["latency_change_pct"].idxmin()]
                noise = {True: "within noise", False: "outside noise"}.get(best["within_noise"], "undecided")
                word = "fastest within tolerance" if best["latency_change_pct"] < 0 else \
                    "no variant within tolerance was faster; least slowdown"
                out.append(f"- batch size {bs}: {word}: **{md_escape(best['variant'])}**, latency {change_cell(best)} "
                           f"vs {md_escape(best['baseline'])} ({noise}; {n_cell(best)} calls × processes).")
            faster = cand[(cand["fidelity"] != "within") & (cand["within_noise"] == False)  # noqa: E712
                          & (cand["latency_change_pct"] < (within["latency_change_pct"].min() if len(within) else 0))]
            if len(faster):
                out.append("  Faster, but not headlined: " + ", ".join(
                    f"{md_escape(r['variant'])} ({fmt_pct(r['latency_change_pct'])}, fidelity {md_escape(r['fidelity'])})"
                    for r in faster.sort_values("latency_change_pct").to_dict("records")) + ".")
        sub = runs[(runs["hardware"] == hw) & (runs["model"] == model) & (runs["status"] == "ok")]
        if len(sub):
            big = sub["batch_size"].max()
            top = sub[sub["batch_size"] == big].sort_values("samples_per_s").iloc[-1]
            out.append(f"- best throughput at batch size {big}: **{md_escape(top['variant'])}**, "
                       f"{fmt_num(top['samples_per_s'], 3)} samples/s.")
        out.append("")
    return "\n".join(out) if out else "_No runs._\n"


def protocol_md(runs: pd.DataFrame, records: list, baseline: str, config_text: str | None) -> str:
    protos = {}
    for folder, rec in records:
        p = {k: v for k, v in rec.protocol.items() if k not in ("batch_size", "prompts")}
        protos.setdefault(folder, p)
    keys = sorted({k for p in protos.values() for k in p})
    rows = {"parameter": [k.replace("_", " ") for k in keys]}
    for folder, p in protos.items():
        rows[md_escape(folder)] = [md_escape(p.get(k)) for k in keys]
    text = (f"Baseline variant: **{md_escape(baseline)}**. Batch sizes: "
            f"{', '.join(str(b) for b in sorted(runs['batch_size'].unique()))}. Variants: "
            f"{', '.join(md_escape(v) for v in runs['variant'].unique())}.\n\n"
            "Each run: load, at least one untimed warm-up call (its time beyond a steady call is the first-call "
            "overhead; for compiled variants the compile time, measured with a cold compile cache), then timed "
            "calls until max iterations, or until at least min iterations were timed and the timed calls took "
            "budget s; a job is stopped at time limit s (recorded as failed when fewer than min iterations were "
            "timed; stopped early as too slow when its first calls show the minimum cannot fit). "
            + (f"Each cell was declared in {int(runs['processes_declared'].max())} fresh processes, run in "
               "interleaved rounds (process *k* of every cell in round *k*, in a seeded random order per round), "
               "and the baseline once more as its own cell, the A/A control. "
               if "processes_declared" in runs and runs["processes_declared"].notna().any() else "")
            + "Protocol of each hardware folder:\n\n" + to_pipe_table(pd.DataFrame(rows)))
    shortened = {}  # the run's estimate shortened the timed calls to fit its run budget (barkbench.estimate)
    for folder, rec in records:
        timed_budget = rec.timing.timed_budget_s if rec.timing is not None else None
        if timed_budget is not None and timed_budget < rec.protocol["budget_s"]:
            shortened.setdefault(folder, set()).add(timed_budget)
    for folder, budgets in shortened.items():
        to = ("min iterations per process" if budgets == {0.0} else
              f"{' / '.join(f'{b:g}' for b in sorted(budgets))} s per process (budget s above)")
        text += (f"\nOn {md_escape(folder)} the run's estimate shortened the timed calls to {to} to fit the run "
                 "budget; each process still made at least min iterations.\n")
    prompts = []
    for _, rec in records:
        for q in rec.protocol.get("prompts") or []:
            if q not in prompts:
                prompts.append(q)
    if prompts:
        text += "\nPrompts (a batch of size *N* uses the first *N*, cycling):\n\n" + "\n".join(
            f"{i}. {md_escape(q)}" for i, q in enumerate(prompts, 1)) + "\n"
    if config_text:
        import hashlib

        digest = hashlib.sha256(config_text.encode()).hexdigest()[:12]
        text += (f"\nEffective configuration (sha256 `{digest}`):\n\n````yaml\n{config_text.strip()}\n````\n")
    return text


def provenance_md(records: list) -> str:
    hw_rows, sw_rows = {}, {}
    for folder, r in records:
        h = r.hardware
        ram = h.get("ram_bytes")
        hw_rows[folder] = {
            "hardware folder": md_escape(folder), "machine id (measured)": md_escape(h.get("id")),
            "node": md_escape(h.get("node")), "CPU": md_escape(h.get("cpu_model")) + (
                f" ({md_escape(h['cpu_generation'])})" if h.get("cpu_generation") else ""), "cores": h.get("cpu_cores"),
            "CPU features": md_escape(", ".join(_cpu_features(h))) + (
                f" (the {md_escape(h['cpu_isa_ceiling'])} ceiling of a CPU with "
                f"{md_escape(', '.join(h.get('cpu_features_native') or []))})" if h.get("cpu_isa_ceiling") else ""),
            "RAM GiB": fmt_num(ram / 2**30, 1) if ram else "", "GPU": md_escape(h.get("gpu_name") or "none"),
            "driver": md_escape(h.get("gpu_driver")), "torch threads": h.get("torch_threads"),
            "device": md_escape(r.device.get("name"))}
        v = r.versions
        sw = {"hardware folder": md_escape(folder), **{k: md_escape(v.get(k) or "") for k in
              ("python", "torch", "transformers", "accelerate", "optimum", "barkbench")},
              "git commit": md_escape(r.git_commit or "")}
        sw_rows[tuple(sw.values())] = sw
    return ("Hardware:\n\n" + to_pipe_table(pd.DataFrame(list(hw_rows.values())))
            + "\nSoftware:\n\n" + to_pipe_table(pd.DataFrame(list(sw_rows.values()))))


def stages_md(runs: pd.DataFrame, calibration: pd.DataFrame | None = None,
              guidance: pd.DataFrame | None = None) -> str:
    ok = runs[runs["status"] == "ok"]
    parts = []
    for (hw, model), g in _setups(ok):
        cells = {"batch size": g["batch_size"].astype(str), "variant": g["variant"].map(md_escape)}
        for st in STAGES:
            sec, tok = g[f"stage_{st}_s"].astype(float), g[f"stage_{st}_tokens"].astype(float)
            cells[f"{st} s (tokens/s)"] = [f"{fmt_num(s)} ({fmt_num(t / s, 1)})" if isnum(s) and s > 0 and isnum(t)
                                           else fmt_num(s) for s, t in zip(sec, tok)]
        for st in ("semantic", "coarse"):  # the decode steps against their floor; the prefills are the rest
            if f"stage_{st}_floor_s" in g and g[f"stage_{st}_floor_s"].notna().any():
                cells[f"{st} decode s / floor s (× floor)"] = [
                    f"{fmt_num(d)} / {fmt_num(f, 3)} (×{fmt_num(x, 1)})" if isnum(f) and isnum(d) else "–"
                    for d, f, x in zip(g[f"stage_{st}_decode_s"], g[f"stage_{st}_floor_s"], g[f"stage_{st}_x_floor"])]
            if f"stage_{st}_matmuls_s" in g and g[f"stage_{st}_matmuls_s"].notna().any():
                cells[f"{st} matmuls alone s (× floor)"] = [
                    f"{fmt_num(m, 3)} (×{fmt_num(x, 1)})" if isnum(m) and isnum(x) else "–"
                    for m, x in zip(g[f"stage_{st}_matmuls_s"], g[f"stage_{st}_matmuls_x_floor"])]
        if "stage_fine_floor_s" in g and g["stage_fine_floor_s"].notna().any():
            cells["fine floor s (× floor)"] = [f"{fmt_num(f, 3)} (×{fmt_num(x, 1)})" if isnum(f) else "–"
                                               for f, x in zip(g["stage_fine_floor_s"], g["stage_fine_x_floor"])]
        parts.append(f"**{md_escape(hw)} · {md_escape(model)}** (medians over the timed calls of each process, "
                     f"then over the processes)\n\n" + to_pipe_table(pd.DataFrame(cells)) + _fine_padding(g))
        parts.append(_calibration_md(calibration, hw) + _guidance_md(guidance, hw, model))
    return "\n".join(parts) if parts else "_No ok runs._\n"


def _calibration_md(calibration: pd.DataFrame | None, hw: str) -> str:
    c = calibration[calibration["hardware"] == hw] if calibration is not None and len(calibration) else None
    if c is None or c.empty:
        return ""
    r = c.iloc[0]

    def fig(col, unit):
        return (f"{fmt_num(r[col + '_median'], 0)} {unit} ({fmt_num(r[col + '_min'], 0)}–"
                f"{fmt_num(r[col + '_max'], 0)})")

    measured = [f"{fig(f'gemm_{fmt}_between_gflop_s', 'GFLOP/s')} {fmt}" for fmt in GEMM_FORMATS
                if isnum(r.get(f"gemm_{fmt}_between_gflop_s_median"))]
    between = ("; the fine stage's own format again before the first timed call and after each (the fine floors take "
               f"each run's median of these; over the runs whose fine stage has it): {', '.join(measured)}"
               if measured else "")

    return (f"Floors: semantic and coarse, what their decode steps must read ÷ read bandwidth: the weights once per "
            f"step (embedding tables excepted) and, per step, the keys and values of every position so far (the "
            f"prompt's and the tokens made; per batch row), against the decode steps' own time (each step from its "
            f"start to the next one's: forward, logits processing, sampling; the rest of the stage is its prefills, a 257-token "
            f"prompt per semantic call and per coarse window; the device-side loop marks its own steps on a CPU, and "
            f"on a GPU has none); fine, FLOPs of its passes over the window it runs ÷ GEMM "
            f"throughput of its number format; each run's own calibration, measured on the job's threads (median and "
            f"range over the {int(r['runs'])} runs): read bandwidth (the faster of a sum and an fp32 GEMV before "
            f"loading; that kernel again before the first timed call and after each, since what the memory gives "
            f"drifts on a shared machine: the floors take each run's median of these) "
            f"{fig('read_bandwidth_gb_s', 'GB/s')} between the calls, {fig('read_bandwidth_start_gb_s', 'GB/s')} "
            f"before loading; GEMM {fig('gemm_fp32_gflop_s', 'GFLOP/s')} fp32, "
            f"{fig('gemm_bf16_gflop_s', 'GFLOP/s')} bf16, {fig('gemm_int8_gflop_s', 'GFLOP/s')} int8 "
            f"(dynamic int8 Linear) before loading{between}. *Matmuls alone*: the weight matmuls of one decode step, "
            f"each on one step's rows, back to back with the variant's own kernels and nothing between them (best of repeated passes, "
            f"measured in each run after loading), times the decode steps: between the floor and the decode time, "
            f"it tells the kernels' own cost on matrices this size (per-call work and thread hand-offs, which a "
            f"single large GEMV does not pay) from everything else in a step (attention, norms, logits processing, "
            f"sampling, `generate`'s loop).\n\n")


def _guidance_md(guidance: pd.DataFrame | None, hw: str, model: str) -> str:
    g = guidance[(guidance["hardware"] == hw) & (guidance["model"] == model)] if guidance is not None and len(
        guidance) else None
    if g is None or g.empty:
        return ""
    ceiling = g.iloc[0].get("cpu_isa_ceiling")
    lines = [f"Guidance for this CPU ({md_escape(g.iloc[0]['cpu_features']) or 'no listed features'}"
             + (f"; this machine under the {md_escape(ceiling)} instruction-set ceiling: {ceiling} kernels, this "
                "machine's cores and memory" if isinstance(ceiling, str) and ceiling else "") + "):"]
    for r in g.itertuples():
        best = (f"fastest within its fidelity limits **{md_escape(r.fastest_within_limits)}** "
                f"({fmt_num(r.latency_median)} s" + (f", {fmt_num(r.speedup)}× the baseline)" if isnum(r.speedup)
                                                    else ")")) if r.fastest_within_limits else "no variant within its limits"
        cannot = json.loads(r.cannot_pay_off or "{}")
        lines.append(f"- batch size {r.batch_size}: {best}" + (
            "; cannot pay off here: " + "; ".join(f"{md_escape(v)} ({md_escape(why)})" for v, why in cannot.items())
            if cannot else "") + ".")
    return "\n".join(lines) + "\n"




def _fine_padding(g: pd.DataFrame) -> str:
    """How much of the fine model's window is padding at the configured length (fixed length mode)."""
    from .models import COARSE_GENERATION, FINE_GENERATION, SEMANTIC_GENERATION  # imports torch: only here

    fixed = g[g["length_mode"] == "fixed"]["max_new_tokens"].dropna().unique()
    if len(fixed) != 1:
        return ""
    tokens = int(fixed[0])
    frames = tokens * COARSE_GENERATION["coarse_rate_hz"] / SEMANTIC_GENERATION["semantic_rate_hz"]
    window = FINE_GENERATION["max_fine_input_length"]
    share = max(0.0, 1 - frames / window)
    return (f"\nAt {tokens} semantic tokens (≈ {tokens / SEMANTIC_GENERATION['semantic_rate_hz']:.2f} s of audio) a "
            f"call has ≈ {frames:.0f} coarse frames, while the fine model always runs its {window}-frame window: "
            f"≈ {100 * share:.0f} % of the fine stage's work is padding, so these stage shares do not represent "
            "real utterances of several seconds.\n")


def audio_md(manifest: pd.DataFrame) -> str:
    lines = [f"**{md_escape(r.variant)}**, batch size {r.batch_size} ({md_escape(r.hardware)} · {md_escape(r.model)})"
             f"\n\n<audio controls src=\"audio/{r.name}\"></audio>\n" for r in manifest.itertuples()]
    return "\n".join(lines) if lines else "_No audio was recorded._\n"


def _opts(value) -> frozenset:
    return frozenset(o for o in str(value).split("+") if o) if isinstance(value, str) else frozenset()


def _protocol_differences(pub: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Each difference between the study's protocol and ours: tokens, timed calls, hardware, weights."""
    study = pub[pub["source"] == "blog-2023"]
    if study.empty or runs.empty:
        return ""
    ok = runs[runs["status"] == "ok"]
    lines = ["How the protocols differ:\n"]
    hw = ", ".join(sorted(set(study["hardware"])))
    ckpt = ", ".join(sorted(set(study["checkpoint"])))
    s_tokens = ", ".join(str(int(x)) for x in sorted(set(study["max_new_tokens"].dropna())))
    s_calls = ", ".join(str(int(x)) for x in sorted(set(study["iterations"].dropna())))
    for (h, model), g in _setups(ok):
        dev = ", ".join(sorted(set(g["device"])))
        weights = ", ".join(f"{w} ({md_escape(i)})" for w, i in sorted(set(zip(g["weights"], g["model_id"]))))
        tokens = ", ".join(f"{int(t)} ({md_escape(m)} length)" for t, m in
                           sorted(set(zip(g["max_new_tokens"], g["length_mode"]))))
        calls = ", ".join(sorted(set(md_escape(x) for x in g["calls_x_processes"])))
        lines += [f"- **{md_escape(h)} · {md_escape(model)}** vs the study:",
                  f"    - hardware: {md_escape(h)} ({md_escape(dev)}) vs {md_escape(hw)}",
                  f"    - weights: {weights} vs {md_escape(ckpt)} (hub)",
                  f"    - semantic tokens per call: {tokens} vs {md_escape(s_tokens)}",
                  f"    - timed calls per cell (calls × processes): {calls} vs {md_escape(s_calls)} calls in one process"]
    return "\n".join(lines) + "\n"


def comparison_md(reference: pd.DataFrame | None, runs: pd.DataFrame, rel: pd.DataFrame) -> str:
    if reference is None or reference.empty:
        return "_Reference data not found._\n"
    pub = reference
    shown = pd.DataFrame({
        "source": pub["source"].map(md_escape), "hardware": pub["hardware"].map(md_escape),
        "checkpoint": pub["checkpoint"].map(md_escape), "batch size": pub["batch_size"].astype(str),
        "variant": pub["variant"].map(md_escape), "latency s": pub["latency_s"].map(fmt_num),
        "peak memory MB": pub["peak_memory_mb"].map(lambda x: fmt_num(x, 0)),
        "samples/s": pub["throughput_samples_per_s"].map(fmt_num)})
    text = (f"Published numbers from the {STUDY}: `blog-2023` is its benchmark, `blog-2023-walkthrough` the short "
            "walk-through in the same post.\n\n" + to_pipe_table(shown) + "\n" + _protocol_differences(pub, runs))
    opts = dict(zip(zip(runs["hardware"], runs["model"], runs["variant"]), runs["optimizations"].map(_opts)))
    rows = []
    for (src, bs), g in pub.groupby(["source", "batch_size"], sort=False):
        base = g[g["variant"] == PUBLISHED_BASELINE]
        if base.empty:
            continue
        base = base.iloc[0]
        for p in g[g["variant"].isin(PUBLISHED_TO_OURS)].itertuples():
            ours = rel[(rel["batch_size"] == bs) & np.array(
                [opts.get(k) == PUBLISHED_TO_OURS[p.variant] for k in zip(rel["hardware"], rel["model"], rel["variant"])],
                dtype=bool)]
            cells = {"study": f"{md_escape(src)}, {md_escape(p.hardware)}, {md_escape(p.checkpoint)}",
                     "published variant": md_escape(p.variant),
                     "published latency": fmt_pct(100 * (p.latency_s / base["latency_s"] - 1)),
                     "published memory": fmt_pct(100 * (p.peak_memory_mb / base["peak_memory_mb"] - 1))}
            if ours.empty:
                rows.append({**cells, "our variant": "not run", "our setup": "", "our latency": "", "our memory": ""})
            for o in ours.to_dict("records"):
                ok = o["status"] == "ok"
                rows.append({**cells, "our variant": md_escape(o["variant"]),
                             "our setup": f"{md_escape(o['hardware'])} · {md_escape(o['model'])}",
                             "our latency": (change_cell(o) or md_escape(o["note"])) if ok else md_escape(o["status"]),
                             "our memory": fmt_pct(o["memory_change_pct"]) if ok else ""})
    text += (f"\nRelative change vs \"{PUBLISHED_BASELINE}\" (published) and vs our baseline, at the published batch "
             "size. Correspondence: bettertransformer ↔ sdpa, fp16 ↔ fp16, offload ↔ offload, "
             "offload + bettertransformer + fp16 ↔ offload+sdpa+fp16.\n\n")
    text += to_pipe_table(pd.DataFrame(rows)) if rows else "_No published baseline to compare with._\n"
    return text + "\n" + callout("note", "Different setups",
                                 "The study ran other hardware (TITAN RTX, Tesla T4), other checkpoints, other library "
                                 "versions and BetterTransformer rather than SDPA: compare directions and rough sizes "
                                 "of the changes, not absolute numbers.")


def _g(x) -> str:
    return f"{float(x):.3g}" if isnum(x) else "–"


def _within(value, bound, upper: bool = True) -> str:
    """A measure with its bound beside it; bold where it is out of bounds."""
    if not isnum(value):
        return "–"
    out = (value > bound) if upper else (value < bound)
    cell = f"{_g(value)} ({'≤' if upper else '≥'} {_g(bound)})"
    return f"**{cell}**" if out else cell


def _path_cell(r, name: str) -> str:
    """Free-running tokens: agreement, how many steps the margins make decisive, and the faults found."""
    return _decisive_cell(r, f"{name}_agreement", f"{name}_decisive_mismatches",
                          lambda r: (f"{int(r[f'{name}_prefix'])}/{int(r[f'{name}_length'])} same; "
                                     f"decisive {r[f'{name}_decisive_share']:.0%}; "),
                          f"**diverged at a decisive step (margin {_g(r[f'{name}_divergence_margin'])})**",
                          "no decisive divergence")


def _decisive_cell(r, measured: str, mismatches: str, compared, faults: str, clean: str = "") -> str:
    """A check's cell: what it compared (`compared(r)`), then its decisive faults in bold (`faults`, {n} their
    number) or `clean`; – where the check did not run (no `measured`)."""
    if not isnum(r[measured]):
        return "–"
    n = int(r[mismatches])
    return compared(r) + (faults.format(n=n) if n else clean)


def _chain_cell(r) -> str:
    return _decisive_cell(r, "chain_codes_agreement", "chain_decisive_mismatches",
                          lambda r: (f"codes {r['chain_codes_agreement']:.1%} same, SNR {fmt_num(r['chain_snr_db'], 1)} dB; "
                                     f"judged {int(r['chain_judged_calls'])}/{int(r['chain_calls'])} fine calls: "),
                          "**{n} decisive code(s) differ**", "no decisive difference")


def _codec_cell(r) -> str:
    if r["codec_untouched"] is True:
        return "n/a (codec untouched)"
    return _within(r["codec_snr_db"], r["tol_min_snr_db"], upper=False) if isnum(r["codec_snr_db"]) else "–"


def _batched_cell(r) -> str:
    return _decisive_cell(r, "batched_size", "batched_decisive_mismatches",
                          lambda r: (f"bs {int(r['batched_size'])} × {int(r['batched_tokens'])} tokens vs bs 1: "
                                     f"min {r['batched_min_agreement']:.0%} same, "
                                     f"rel err {_within(r['batched_max_rel'], r['tol_logits_max_rel'])}"),
                          "; **{n} decisive divergence(s)**")


def _reference_cell(r) -> str:
    formats = r.get("reference_formats")
    return md_escape(f"{formats} simulation" if isinstance(formats, str) and formats else "baseline")


def _measured_cell(r) -> str:
    where, warning = r.get("limits_measured"), r.get("limits_warning")
    if not isinstance(where, str):
        return "–"
    return md_escape(where) + (f" — **{md_escape(warning)}**" if isinstance(warning, str) and warning else "")


def _format_cost_md(fid: pd.DataFrame) -> str:
    """What each lossy variant's number format costs, apart from the implementation verdict: llama.cpp's KL
    statistics of the reference and of the candidate against the baseline, per sub-model and fine codebook."""
    if "cost_reference_kl_mean" not in fid:
        return ""
    lossy = fid[fid["cost_reference_kl_mean"].notna()]
    if lossy.empty:
        return ""

    def kl(r, who):
        se = r[f"cost_{who}_kl_mean_se"]
        return f"{_g(r[f'cost_{who}_kl_mean'])} ± {_g(se)}" if isnum(se) else _g(r[f"cost_{who}_kl_mean"])

    def top1(r, who):
        return f"{r[f'cost_{who}_same_top1']:.1%} ± {r[f'cost_{who}_same_top1_sigma']:.1%}"

    def verdict(r):
        if r["cost_within_targets"] is True:
            return "within targets"
        if r["cost_within_targets"] is False:
            return "**outside targets**: " + md_escape(r["cost_misses"] or "")
        return "no verdict (below)"

    table = pd.DataFrame({
        "hardware": lossy["hardware"].map(md_escape), "model": lossy["model"].map(md_escape),
        "variant": lossy["variant"].map(md_escape), "format": lossy["reference_formats"].map(md_escape),
        "sub-model": lossy["stage"].map(md_escape),
        "reference: KL mean ± se": [kl(r, "reference") for _, r in lossy.iterrows()],
        "reference: KL p99": lossy["cost_reference_kl_p99"].map(_g),
        "reference: Δp p1 / p99": [f"{_g(r['cost_reference_dp_p1'])} / {_g(r['cost_reference_dp_p99'])}"
                                   for _, r in lossy.iterrows()],
        "reference: same top-1 ± σ": [top1(r, "reference") for _, r in lossy.iterrows()],
        "candidate: KL mean ± se": [kl(r, "candidate") for _, r in lossy.iterrows()],
        "candidate: Δp p1 / p99": [f"{_g(r['cost_candidate_dp_p1'])} / {_g(r['cost_candidate_dp_p99'])}"
                                   for _, r in lossy.iterrows()],
        "candidate: same top-1 ± σ": [top1(r, "candidate") for _, r in lossy.iterrows()],
        "cost verdict": [verdict(r) for _, r in lossy.iterrows()],
    })
    return ("\n\n### What each number format costs\n\nThe reference simulation's and the candidate's distance to "
            "the baseline, as llama.cpp reports a quantized model's (KL(baseline ‖ model) mean ± its standard error and "
            "99th percentile, percentiles of Δp = p(model) − p(baseline) of the baseline's top token, same top-1 share "
            "± its binomial σ), teacher-forced on the same inputs. A verdict is given only on hub weights, against "
            "targets written in the config before the run; on synthetic weights the numbers are reported without "
            "one.\n\n" + to_pipe_table(table) + "\n\nNo verdict:\n\n"
            + "\n".join(f"- {md_escape(r)}" for r in sorted(set(lossy["cost_verdict_reason"].dropna()))))


def faults_md(faults: pd.DataFrame) -> str:
    """The fault suite: how far inside its limits each correct variant lies, how far outside each fault."""
    if faults.empty:
        return ""
    parts = ["### Fault suite: the limits catch plausible faults near them\n\n"
             "Each row is a registry variant loaded as the fidelity check loads it, judged as the check judges it "
             "(same reference simulation, same limits); a *fault* has one thing done wrong after loading (a scale 2 % "
             "off, per-channel scales where the scheme has one per tensor, an activation quantized twice, a bf16 "
             "softmax without fp32 accumulation, a padded row's mask off by one, one op in the wrong precision). "
             "*Largest measure / limit*: below 1 within, above 1 outside; ∞ where a free-running path diverged at a "
             "decisive step."]
    for (hw, model), g in faults.groupby(["hardware", "model"], sort=False):
        ran = g["not_run"].isna() if "not_run" in g else pd.Series(True, index=g.index)
        missed = g[ran & g["fault"] & (g["caught"] == False)]["case"].tolist()  # noqa: E712 (a column of objects)
        failing = g[ran & ~g["fault"] & (g["caught"] == True)]["case"].tolist()  # noqa: E712
        skipped = g[~ran].groupby("not_run", sort=False)["case"].agg(list) if "not_run" in g else {}
        verdict = ("; ".join([f"**missed: {', '.join(map(md_escape, missed))}**"] * bool(missed)
                             + [f"**correct but outside: {', '.join(map(md_escape, failing))}**"] * bool(failing))
                   or "every fault caught, every correct variant within")
        if len(skipped):
            whys = {why: "the run's budget spent" if why == FAULT_BUDGET_SPENT else md_escape(why)
                    for why, _ in skipped.items()}
            verdict += " (of the cases run; " + "; ".join(f"not run, {whys[why]}: {', '.join(map(md_escape, cases))}"
                                                          for why, cases in skipped.items()) + ")"
        table = pd.DataFrame({
            "case": g["case"].map(md_escape), "variant": g["variant"].map(md_escape),
            "kind": g["fault"].map(lambda f: "fault" if f else "correct"),
            "largest measure / limit": ["∞" if d else f"{x:.3g}" if isnum(x) else "–"
                                        for d, x in zip(g["diverged"], g["distance"])],
            "verdict": ["not run" if not r else ("caught" if c else "**MISSED**") if f else ("**outside**" if c else "within")
                        for r, f, c in zip(ran, g["fault"], g["caught"])],
            "first violation": g["first_violation"].map(lambda v: md_escape(v[:100]) if isinstance(v, str) else ""),
        })
        first = g.iloc[0]
        parts.append(f"**{md_escape(hw)} · {md_escape(model)}** ({md_escape(first['model_id'])}, {first['weights']} "
                     f"weights, {md_escape(first['device'])}, {int(first['tokens'])} "
                     f"tokens, {md_escape(first['inputs'])}): {verdict}.\n\n{to_pipe_table(table)}")
    return "\n\n".join(parts)


def fidelity_md(fid: pd.DataFrame) -> str:
    if fid.empty:
        return ""
    per_variant = fid.drop_duplicates(["hardware", "model", "variant"])
    tol = {json.loads(t).get("note") for t in per_variant["tolerance"]}
    verdicts = pd.DataFrame({
        "hardware": per_variant["hardware"].map(md_escape), "model": per_variant["model"].map(md_escape),
        "variant": per_variant["variant"].map(md_escape), "baseline": per_variant["baseline"].map(md_escape),
        "status": per_variant["status"].map(md_escape),
        "judged against": [_reference_cell(r) for _, r in per_variant.iterrows()],
        "implementation: within limits": ["yes" if w is True else "**NO** ⚠" if w is False else ""
                                          for w in per_variant["within_tolerance"]],
        "limits": [md_escape(" + ".join(part.split(":")[0] for part in (json.loads(t).get("note") or "").split("; ")))
                   for t in per_variant["tolerance"]],
        "limits measured on": [_measured_cell(r) for _, r in per_variant.iterrows()],
        "semantic tokens (free-running)": [_path_cell(r, "semantic") for _, r in per_variant.iterrows()],
        "coarse tokens (free-running)": [_path_cell(r, "coarse") for _, r in per_variant.iterrows()],
        "end-to-end chain (fine codes + codec)": [_chain_cell(r) for _, r in per_variant.iterrows()],
        "codec only, same codes: SNR dB": [_codec_cell(r) for _, r in per_variant.iterrows()],
        "batched (padded prompts)": [_batched_cell(r) for _, r in per_variant.iterrows()],
        "violations / reason": [md_escape(v or r or "") for v, r in zip(per_variant["violations"], per_variant["reason"])],
    })
    staged = fid[fid["stage"].notna()] if "stage" in fid else fid.iloc[0:0]
    stages = pd.DataFrame({
        "hardware": staged["hardware"].map(md_escape), "model": staged["model"].map(md_escape),
        "variant": staged["variant"].map(md_escape), "sub-model": staged["stage"].map(md_escape),
        "KL mean": [_within(r["kl_mean"], r["tol_kl_mean"]) for _, r in staged.iterrows()],
        "KL p99": [_within(r["kl_p99"], r["tol_kl_p99"]) for _, r in staged.iterrows()],
        "same top-1": staged["same_top1"].map(lambda x: f"{x:.1%}" if isnum(x) else "–"),
        "max abs Δp top": [_within(r["max_dp_top"], r["tol_max_dp_top"]) for _, r in staged.iterrows()],
        "max logit err / max abs logit": [_within(r["max_rel"], r["tol_logits_max_rel"]) for _, r in staged.iterrows()],
        "max logit err": staged["max_abs"].map(_g),
        "baseline margin median / p10": [f"{_g(r['margin_median'])} / {_g(r['margin_p10'])}" for _, r in staged.iterrows()],
    })
    notes = "\n".join(f"- {md_escape(part)}" for part in sorted({p for t in tol if t for p in t.split("; ")}))
    return ("## Fidelity vs the baseline\n\nTwo questions, two answers. *Is the implementation right?* Each variant "
            "against the reference simulation of its number format (the baseline cast to bf16/fp16, or with its "
            "Linear layers fake-quantized as the variant's scheme quantizes them; the baseline itself for exact "
            "optimizations), on the same inputs, with limits fixed in the registry before any variant is measured: the "
            "fp32 rounding floor plus a share of the reference's own distance to the baseline, per sub-model, and per "
            "quantized layer on the candidate's own input (where each limit was calibrated is listed below the table, "
            "and a verdict on another device or another kind of weights says so). *What does the format cost?* The "
            "reference's and the candidate's distance to the baseline, in the next table. Logit errors are judged "
            "relative to the reference's largest |logit| (random weights give far smaller logits than trained ones). "
            "Free-running tokens are judged by margins: a step whose top-1/top-2 margin exceeds twice the logit error "
            "the limit allows cannot flip within the limit (\"decisive\"), so a divergence there is a fault; a "
            "divergence at a smaller margin is a near tie and is not judged. The chain compares the candidate's fine codes (from the baseline's coarse tokens) decoded "
            "by the candidate's codec with the baseline's chain; the codec-only SNR decodes the baseline's codes with "
            "the candidate's codec and is n/a where the codec is untouched. Batched: a padded batch of prompts of "
            "different lengths through the candidate's semantic generate, each row against the baseline at bs 1.\n\n"
            + to_pipe_table(verdicts) + f"\n\nLimits (how each was calibrated):\n\n{notes}" + _format_cost_md(fid)
            + ("\n\n### Teacher-forced distributions per sub-model and fine codebook\n\nKL(reference ‖ candidate) in "
               "nats over the same inputs (the reference: the baseline, or its number format's simulation), share of positions with the same top-1 token, max |Δp| of the baseline's "
               "top token, max logit error, and the baseline's top-1/top-2 logit margin (small margins: a flat "
               "model, where greedy tokens flip on any perturbation).\n\n" + to_pipe_table(stages) if len(stages) else ""))


def _key_cells(df: pd.DataFrame) -> dict:
    return {"hardware": df["hardware"].map(md_escape), "model": df["model"].map(md_escape),
            "batch size": df["batch_size"].astype(str), "variant": df["variant"].map(md_escape)}


def repro_md(rep: pd.DataFrame) -> str:
    if rep.empty:
        return ""
    cells = pd.DataFrame({
        **_key_cells(rep),
        "reps (ok)": [f"{a} ({b})" for a, b in zip(rep["reps"], rep["ok_reps"])], "n per rep": rep["n_per_rep"],
        "median per rep, s": [", ".join(fmt_num(m) for m in json.loads(x)) for x in rep["medians_s"]],
        "max/min − 1": rep["spread_pct"].map(fmt_pct),
        "< 5 %": rep["reproducible"].map({True: "yes", False: "**no**"})})
    return ("## Reproducibility\n\nEach repetition is a fresh process running the full protocol; the spread is the "
            "relative difference between the largest and the smallest per-repetition median.\n\n" + to_pipe_table(cells))


def overhead_md(df: pd.DataFrame) -> str:
    if df.empty:
        return ""
    cells = pd.DataFrame({
        **_key_cells(df),
        "plain median s": df["plain_median_s"].map(fmt_num),
        "instrumented median s": df["instrumented_median_s"].map(fmt_num),
        "calls × processes (plain vs instrumented)": [n_cell(r) for r in df.to_dict("records")],
        "change [interval]": [change_cell(r) or md_escape(r["note"]) for r in df.to_dict("records")],
        "within noise": [noise_cell(w, c) for w, c in zip(df.get("within_noise", pd.Series([None] * len(df))),
                                                         df.get("latency_change_pct", pd.Series([None] * len(df))))],
        "timer cost, direct": [f"{x:.4f} %" if isnum(x) else "" for x in df["timer_cost_pct"]]})
    direct = df["timer_cost_pct"].dropna()
    verdict = ""
    if len(direct):
        worst = direct.max()
        verdict = (f" Measured directly (the stage methods of a stand-in model called with and without the timers), "
                   f"the timers cost at most {worst:.4f} % of a call's latency: "
                   + ("under the 1 % budget." if worst < 1 else "**over the 1 % budget**."))
    return ("## Instrumentation overhead\n\nInstrumented runs (per-stage timers on) against plain runs without stage "
            "timers, same configuration, separate processes; the interval includes the run's between-process "
            "variance (one plain process against the instrumented cell's processes)." + verdict + "\n\n" + to_pipe_table(cells))


def stacks_md(stacks: pd.DataFrame, fid: pd.DataFrame) -> str:
    """The 2023 stack vs today: its own section, because the library versions differ."""
    if stacks.empty:
        return "_No legacy+ variant configured: the 2023 stack was not measured._\n"
    text = ("The study's variants on its own software stack (`legacy+`: transformers 4.45 with optimum's "
            "BetterTransformer `bt`, `envs/legacy-requirements.txt`) beside today's, on the same machine, weights "
            "and protocol. The library versions differ (column *differs*), so these changes are not in the "
            "like-for-like tables above. *Change*: today's latency relative to the 2023 stack's (interval with its level); "
            "*speed-up*: each variant against the eager baseline of its own stack; *published*: the study's "
            "change for the same optimization (GPU, suno/bark).\n\n")
    shown = pd.DataFrame({
        "setup": [f"{md_escape(h)} · {md_escape(m)} · bs {b}" for h, m, b in
                  zip(stacks["hardware"], stacks["model"], stacks["batch_size"])],
        "comparison": stacks["comparison"].map(md_escape),
        "2023 stack": [f"{md_escape(v)}: {fmt_num(x)} s" if isnum(x) else md_escape(v)
                       for v, x in zip(stacks["variant_2023"], stacks["latency_2023_s"])],
        "today": [f"{md_escape(v)}: {fmt_num(x)} s" if isnum(x) else md_escape(v or "")
                  for v, x in zip(stacks["variant_today"], stacks["latency_today_s"])],
        "change [interval]": [change_cell(r) if isnum(r["latency_change_pct"]) else md_escape(r["note"])
                              for r in stacks.to_dict("records")],
        "calls × processes": [n_cell(r) for r in stacks.to_dict("records")],
        "speed-up 2023 / today": [" / ".join(f"{fmt_num(x)}×" if isnum(x) else "–" for x in (a, b))
                                  for a, b in zip(stacks["speedup_2023"], stacks["speedup_today"])],
        "published": stacks["published_pct"].map(lambda x: fmt_pct(x) if isnum(x) else ""),
        "differs": stacks["differs"].map(lambda x: md_escape(x) if isinstance(x, str) else ""),
    })
    text += to_pipe_table(shown)
    padded = fid[fid["padded_kl_mean"].notna()] if "padded_kl_mean" in fid else fid.iloc[0:0]
    padded = padded.drop_duplicates(["hardware", "model", "variant"])  # one row per record (rows are per stage)
    if not padded.empty:
        text += ("\n**Padded batch** (8 prompts of different lengths, the shorter ones left-padded): semantic logits "
                 "at the real positions of the padded rows, teacher-forced with the attention mask, against the "
                 "baseline on the same stack. (`BarkModel.generate` pads every prompt to 256 tokens with Bark's pad "
                 "token and passes no mask to the attention: its own batches never meet the bug.)\n\n")
        text += to_pipe_table(pd.DataFrame({
            "setup": [f"{md_escape(h)} · {md_escape(m)}" for h, m in zip(padded["hardware"], padded["model"])],
            "variant": padded["variant"].map(md_escape), "against": padded["baseline"].map(md_escape),
            "padded rows": padded["padded_rows"].map(lambda x: f"{x:.0f}"),
            "KL mean": padded["padded_kl_mean"].map(_g),
            "max logit error (of the largest)": padded["padded_max_rel"].map(_g),
            "same top-1": padded["padded_same_top1"].map(lambda x: f"{100 * x:.1f} %")}))
    return text
