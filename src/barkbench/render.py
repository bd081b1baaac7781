"""Render report/report.qmd into one self-contained HTML file.

All data-derived content is written by Python as Markdown fragments into `_generated/` next to a staged copy
of the .qmd, which pulls them with `{{< include ... >}}` shortcodes. `quarto render` is used when quarto is on
PATH; otherwise pandoc (from pypandoc-binary) with `filters/quarto-compat.lua`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from barkbench.aggregate import (BASELINE, STAGES, _isnum, absolute_markdown_df, absolute_table, find_inputs, fmt_num,
                                 fmt_pct, latencies, load_fidelity, load_runs, md_escape, model_slug,
                                 relative_markdown_df, relative_table, to_pipe_table, variant_order)
from barkbench.figures import FIGURES, make_figures
from barkbench.stats import relative_change

REPRO_TOLERANCE = 0.05  # max relative spread of per-rep medians to call a variant reproducible

# published variant of the 2023 study -> our optimizations
PUBLISHED_TO_OURS = {
    "bettertransformer": {"sdpa"},
    "fp16": {"fp16"},
    "offload": {"offload"},
    "offload + bettertransformer": {"offload", "sdpa"},
    "offload + bettertransformer + fp16": {"offload", "sdpa", "fp16"},
}
PUBLISHED_BASELINE = "no optimization"
STUDY = ('Hugging Face blog "Optimizing Bark using 🤗 Transformers", Aug 2023 '
         "(<https://huggingface.co/blog/optimizing-bark>)")

FIGURE_CAPTIONS = {
    "latency": "Median latency of one generate call per variant; error bars: bootstrap 95 % CI of the median. "
               "One panel per batch size.",
    "memory": "Peak memory per variant (peak CUDA allocated memory on GPU, peak anonymous RSS on CPU: the process's own resident memory, weights copied out of the memory-mapped checkpoint first).",
    "throughput": "Throughput in samples per second at the largest batch size.",
    "pareto": "Latency against peak memory; red points joined by the line form the Pareto front "
              "(no other variant is both faster and smaller).",
    "stages": "Median time spent in each stage (semantic, coarse, fine, decode) per variant.",
    "lengths": "Distribution of the generated semantic lengths per variant (natural length mode only).",
}


def find_renderer() -> str:
    """"quarto" when the quarto CLI is on PATH, else "pandoc" (bundled with pypandoc-binary)."""
    return "quarto" if shutil.which("quarto") else "pandoc"


# ---------------------------------------------------------------- inputs

def _read_json(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def repro_table(paths) -> pd.DataFrame:
    """Per (hardware, model, variant, batch size): per-rep medians, relative spread (max/min − 1), CI overlap."""
    reps = load_runs(paths)
    reps = reps[reps["status"] == "ok"] if len(reps) else reps
    rows = []
    for (hw, model, bs, variant), g in (reps.groupby(["hardware", "model", "batch_size", "variant"]) if len(reps) else []):
        med = g["latency_median"].to_numpy(float)
        spread = med.max() / med.min() - 1
        overlap = bool(g["latency_ci95_low"].max() <= g["latency_ci95_high"].min())
        rows.append({"hardware": hw, "model": model, "batch_size": bs, "variant": variant, "reps": len(g),
                     "medians_s": ", ".join(fmt_num(m) for m in med), "spread_pct": 100 * spread,
                     "spread_below_5pct": bool(spread < REPRO_TOLERANCE), "cis_overlap": overlap})
    return pd.DataFrame(rows)


def overhead_table(plain_paths, runs: pd.DataFrame) -> pd.DataFrame:
    """Stage-timer overhead: instrumented runs vs plain runs (`instrumented: false`) of the same configuration."""
    plain = load_runs(plain_paths)
    rows = []
    for _, p in plain[plain["status"] == "ok"].iterrows():
        m = runs[(runs["hardware"] == p["hardware"]) & (runs["model"] == p["model"]) & (runs["variant"] == p["variant"])
                 & (runs["batch_size"] == p["batch_size"]) & (runs["status"] == "ok")]
        if m.empty:
            continue
        rc = relative_change(latencies(p), latencies(m.iloc[0]))
        rows.append({"hardware": p["hardware"], "model": p["model"], "variant": p["variant"],
                     "batch_size": p["batch_size"], "plain_median_s": p["latency_median"],
                     "instrumented_median_s": m.iloc[0]["latency_median"], "overhead_pct": 100 * rc["change"],
                     "ci95_low_pct": 100 * rc["ci95_low"], "ci95_high_pct": 100 * rc["ci95_high"],
                     "within_noise": rc["within_noise"],
                     "timer_cost_pct": 100 * m.iloc[0].get("stage_timer_overhead_s", np.nan) / m.iloc[0]["latency_median"]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- fragments

def _callout(kind: str, title: str, body: str) -> str:
    return f'::: {{.callout-{kind} title="{title}"}}\n{body.strip()}\n:::\n'


def _setups(df):
    return df.groupby(["hardware", "model"], sort=False)


def warning_md(raw: list[dict]) -> str:
    synth = [r for r in raw if (r.get("model") or {}).get("weights") == "synthetic"]
    if not synth:
        return ""
    used = sorted({r["model"].get("id") for r in synth})
    lines = [f"**These results were measured with SYNTHETIC weights ({', '.join(f'`{u}`' for u in used)}): "
             "the exact architecture of the Bark checkpoint with RANDOM weights. The audio samples are noise.** "
             "Latency (in fixed length mode every call decodes the same number of tokens), memory and "
             "throughput are meaningful and comparable with real weights; what the model says is not."]
    for req, ran in sorted({(r["model"].get("requested"), r["model"].get("id")) for r in synth}):
        if req != ran:
            lines.append(f"- model requested `{req}`, ran `{ran}`: the hub was unreachable and nothing was cached")
    if len(lines) > 1:
        lines.insert(1, "")
    return _callout("warning", "Synthetic weights: audio is noise", "\n".join(lines))


def _ci_text(r) -> str:
    noise = "within noise" if r["within_noise"] else "outside noise"
    return (f"latency {fmt_pct(r['latency_change_pct'])} [{fmt_pct(r['latency_change_ci95_low_pct'])}, "
            f"{fmt_pct(r['latency_change_ci95_high_pct'])}] vs {BASELINE}, {noise}")


def findings_md(runs: pd.DataFrame, rel: pd.DataFrame, fidelity: pd.DataFrame | None) -> str:
    out = []
    for (hw, model), grp in _setups(rel):
        out.append(f"**{md_escape(hw)} · {md_escape(model)}**\n")
        ok = grp[(grp["status"] == "ok") & (grp["variant"] != BASELINE) & grp["latency_change_pct"].notna()]
        for bs, g in grp.groupby("batch_size"):
            cand = ok[ok["batch_size"] == bs]
            if cand.empty:
                out.append(f"- batch size {bs}: no optimized variant with an ok {BASELINE} baseline.")
                continue
            best = cand.loc[cand["latency_change_pct"].idxmin()]
            mem = cand.loc[cand["memory_change_pct"].idxmin()]
            word = "largest latency reduction" if best["latency_change_pct"] < 0 else "no variant was faster; least slowdown"
            memtxt = (f"best memory reduction **{md_escape(mem['variant'])}** ({fmt_pct(mem['memory_change_pct'])})"
                      if mem["memory_change_pct"] < 0 else "no variant reduced peak memory")
            out.append(f"- batch size {bs}: {word} **{md_escape(best['variant'])}**, {_ci_text(best)}; {memtxt}.")
        sub = runs[(runs["hardware"] == hw) & (runs["model"] == model) & (runs["status"] == "ok")]
        if len(sub):
            big = sub["batch_size"].max()
            top = sub[sub["batch_size"] == big].sort_values("samples_per_s").iloc[-1]
            change = grp[(grp["batch_size"] == big) & (grp["variant"] == top["variant"])]["throughput_change_pct"]
            vs = f" ({fmt_pct(change.iloc[0])} vs {BASELINE})" if len(change) and pd.notna(change.iloc[0]) else ""
            out.append(f"- best throughput at batch size {big}: **{md_escape(top['variant'])}**, "
                       f"{fmt_num(top['samples_per_s'], 3)} samples/s{vs}.")
        if fidelity is not None and len(fidelity):
            fid = fidelity[(fidelity["hardware"] == hw) & (fidelity["model_slug"] == model_slug(model))]
            good = set(fid[fid["within_tolerance"] == True]["variant"]) | {BASELINE}  # noqa: E712
            for bs, g in sub.groupby("batch_size"):
                g = g[g["variant"].isin(good)]
                if len(g):
                    f = g.sort_values("latency_median").iloc[0]
                    out.append(f"- fastest variant within fidelity tolerance at batch size {bs}: "
                               f"**{md_escape(f['variant'])}** ({fmt_num(f['latency_median'])} s median).")
        out.append("")
    return "\n".join(out) if out else "_No runs._\n"


def unavailable_md(runs: pd.DataFrame) -> str:
    bad = runs[runs["status"] != "ok"]
    if bad.empty:
        return ""
    lines = [f"- **{md_escape(r.variant)}**, batch size {r.batch_size} ({md_escape(r.hardware)} · {md_escape(r.model)}): "
             f"{md_escape(r.status)}: {md_escape(r.reason) or 'no reason given'}" for r in bad.itertuples()]
    kind = "important" if (bad["status"] == "failed").any() else "note"
    return _callout(kind, "Variants not applicable or failed", "\n".join(lines))


def _uniq(values) -> str:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return ", ".join(md_escape(v) for v in seen)


def protocol_md(raw: list[dict]) -> str:
    protos = [r.get("protocol") or {} for r in raw]
    keys = ["warmup", "iterations", "max_new_tokens", "length_mode", "do_sample", "fine_temperature",
            "coarse_temperature", "seed"]
    rows = [("baseline variant", md_escape(BASELINE)),
            ("batch sizes", ", ".join(str(b) for b in sorted({p.get("batch_size") for p in protos if p.get("batch_size")}))),
            ("variants", ", ".join(md_escape(v) for v in variant_order((r.get("variant") or {}).get("name", "") for r in raw)))]
    rows += [(k.replace("_", " "), _uniq(p.get(k) for p in protos)) for k in keys]
    prompts = []
    for p in protos:
        for q in p.get("prompts") or []:
            if q not in prompts:
                prompts.append(q)
    text = to_pipe_table(pd.DataFrame(rows, columns=["parameter", "value"]))
    if prompts:
        text += "\nPrompts (a batch of size *N* uses the first *N*, cycling):\n\n" + "\n".join(
            f"{i}. {md_escape(q)}" for i, q in enumerate(prompts, 1)) + "\n"
    return text


def provenance_md(raw: list[dict]) -> str:
    hw_rows, sw_rows = {}, {}
    for r in raw:
        h = r.get("hardware") or {}
        ram = h.get("ram_bytes")
        hw_rows[h.get("id")] = {
            "hardware id": md_escape(h.get("id")), "CPU": md_escape(h.get("cpu_model")), "cores": h.get("cpu_cores"),
            "RAM GiB": fmt_num(ram / 2**30, 1) if ram else "", "GPU": md_escape(h.get("gpu_name") or "none"),
            "driver": md_escape(h.get("gpu_driver")), "compute capability": md_escape(h.get("gpu_compute_capability")),
            "torch threads": h.get("torch_threads"), "device": md_escape((r.get("device") or {}).get("name"))}
        v = r.get("versions") or {}
        sw = {"hardware id": md_escape(h.get("id")), **{k: md_escape(v.get(k) or "") for k in
              ("python", "torch", "transformers", "accelerate", "optimum", "barkbench")},
              "git commit": md_escape(r.get("git_commit") or "")}
        sw_rows[tuple(sw.values())] = sw
    return ("Hardware:\n\n" + to_pipe_table(pd.DataFrame(list(hw_rows.values())))
            + "\nSoftware:\n\n" + to_pipe_table(pd.DataFrame(list(sw_rows.values()))))


def tables_md(runs: pd.DataFrame) -> str:
    absolute, rel = absolute_table(runs), relative_table(runs)
    parts = []
    for (hw, model), g in _setups(absolute):
        r = rel[(rel["hardware"] == hw) & (rel["model"] == model)]
        parts.append(f"### {md_escape(hw)} · {md_escape(model)}\n\nAbsolute numbers:\n\n"
                     f"{to_pipe_table(absolute_markdown_df(g))}\nChange vs {BASELINE} (same batch size):\n\n"
                     f"{to_pipe_table(relative_markdown_df(r))}")
    return "\n".join(parts)


def figures_md(names) -> str:
    parts = [f"![{FIGURE_CAPTIONS[n]}](figures/{n}.png){{#fig-{n}}}\n" for n in names]
    if "lengths" in names:
        parts.insert(0, "The spread of generated semantic lengths, which drives latency when the length mode is "
                        "natural, is shown in @fig-lengths.\n")
    return "\n".join(parts)


def stages_md(runs: pd.DataFrame) -> str:
    ok = runs[runs["status"] == "ok"]
    parts = []
    for (hw, model), g in _setups(ok):
        cells = {"batch size": g["batch_size"].astype(str), "variant": g["variant"].map(md_escape)}
        for st in STAGES:
            sec, tok = g[f"stage_{st}_s"].astype(float), g[f"stage_{st}_tokens"].astype(float)
            cells[f"{st} s (tokens/s)"] = [f"{fmt_num(s)} ({fmt_num(t / s, 1)})" if pd.notna(s) and s > 0 and pd.notna(t)
                                           else fmt_num(s) for s, t in zip(sec, tok)]
        parts.append(f"**{md_escape(hw)} · {md_escape(model)}** (medians over iterations)\n\n"
                     + to_pipe_table(pd.DataFrame(cells)))
    return "\n".join(parts) if parts else "_No ok runs._\n"


def audio_md(runs: pd.DataFrame, build: Path) -> str:
    lines = []
    for r in runs[runs["status"] == "ok"].itertuples():
        if not isinstance(r.wav, str) or not Path(r.wav).is_file():
            continue
        name = f"{model_slug(r.hardware)}__{model_slug(r.model)}__{r.variant}__bs{r.batch_size}.wav".replace("+", "-")
        (build / "audio").mkdir(exist_ok=True)
        shutil.copyfile(r.wav, build / "audio" / name)
        lines.append(f"**{md_escape(r.variant)}**, batch size {r.batch_size} ({md_escape(r.hardware)} · "
                     f"{md_escape(r.model)})\n\n<audio controls src=\"audio/{name}\"></audio>\n")
    return "\n".join(lines) if lines else "_No audio was recorded._\n"


def _opts(value) -> frozenset:
    return frozenset(o for o in str(value).split("+") if o and o != "nan") if isinstance(value, str) else frozenset()


def comparison_md(reference: pd.DataFrame | None, runs: pd.DataFrame, rel: pd.DataFrame) -> str:
    if reference is None or reference.empty:
        return "_Reference data not found._\n"
    pub = reference.copy()
    shown = pd.DataFrame({
        "source": pub["source"].map(md_escape), "hardware": pub["hardware"].map(md_escape),
        "checkpoint": pub["checkpoint"].map(md_escape), "batch size": pub["batch_size"].astype(str),
        "variant": pub["variant"].map(md_escape), "latency s": pub["latency_s"].map(fmt_num),
        "peak memory MB": pub["peak_memory_mb"].map(lambda x: fmt_num(x, 0)),
        "samples/s": pub["throughput_samples_per_s"].map(fmt_num)})
    text = (f"Published numbers from the {STUDY}: `blog-2023` is its 100-iteration benchmark, "
            "`blog-2023-walkthrough` the short walk-through in the same post.\n\n" + to_pipe_table(shown))
    rows = []
    opts_of = dict(zip(zip(runs["hardware"], runs["model"], runs["variant"]), runs["optimizations"].map(_opts)))
    for (src, bs), g in pub.groupby(["source", "batch_size"], sort=False):
        base = g[g["variant"] == PUBLISHED_BASELINE]
        if base.empty:
            continue
        base = base.iloc[0]
        for p in g[g["variant"].isin(PUBLISHED_TO_OURS)].itertuples():
            match = np.array([opts_of.get(k) == PUBLISHED_TO_OURS[p.variant]
                              for k in zip(rel["hardware"], rel["model"], rel["variant"])], dtype=bool)
            ours = rel[(rel["batch_size"] == bs).to_numpy() & match]
            pub_cells = {"study": f"{md_escape(src)}, {md_escape(p.hardware)}, {md_escape(p.checkpoint)}",
                         "published variant": md_escape(p.variant),
                         "published latency": fmt_pct(100 * (p.latency_s / base["latency_s"] - 1)),
                         "published memory": fmt_pct(100 * (p.peak_memory_mb / base["peak_memory_mb"] - 1))}
            if ours.empty:
                rows.append({**pub_cells, "our variant": "not run", "our setup": "", "our latency": "", "our memory": ""})
            for o in ours.itertuples():
                ok = o.status == "ok"
                rows.append({**pub_cells, "our variant": md_escape(o.variant),
                             "our setup": f"{md_escape(o.hardware)} · {md_escape(o.model)}",
                             "our latency": relative_markdown_df(pd.DataFrame([o._asdict()]))["latency change [95 % CI]"].iloc[0]
                             if ok else md_escape(o.status),
                             "our memory": fmt_pct(o.memory_change_pct) if ok else ""})
    text += (f"\nRelative change vs \"{PUBLISHED_BASELINE}\" (published) and vs `{BASELINE}` (ours), batch size 1. "
             "Correspondence: bettertransformer ↔ sdpa, fp16 ↔ fp16, offload ↔ offload, "
             "offload + bettertransformer + fp16 ↔ offload+sdpa+fp16.\n\n")
    text += to_pipe_table(pd.DataFrame(rows)) if rows else "_No published baseline to compare with._\n"
    text += ("\n" + _callout("note", "Different setups",
                             "The study ran other hardware (TITAN RTX, Tesla T4), other checkpoints (`suno/bark`, "
                             "`suno/bark-small`), other library versions and BetterTransformer rather than SDPA; "
                             "compare directions and rough sizes of the changes, not absolute numbers."))
    return text


def _g(x) -> str:
    return f"{float(x):.3g}" if x is not None and pd.notna(x) else "–"


def fidelity_md(fid: pd.DataFrame | None) -> str:
    if fid is None or fid.empty:
        return ""
    tol = max((json.loads(t) for t in fid["tolerance"]), key=len)
    tol_txt = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in tol.items() if k != "note")
    cells = pd.DataFrame({
        "hardware": fid["hardware"].map(md_escape), "model": fid["model_slug"].map(md_escape),
        "variant": fid["variant"].map(md_escape), "status": fid["status"].map(md_escape),
        "logits max abs (sem/coarse/fine)": ["/".join(_g(r[f"{s}_max_abs"]) for s in ("semantic", "coarse", "fine"))
                                            for _, r in fid.iterrows()],
        "logits max rel": ["/".join(_g(r[f"{s}_max_rel"]) for s in ("semantic", "coarse", "fine"))
                           for _, r in fid.iterrows()],
        "token agreement (sem/coarse)": ["/".join(_g(r[f"{s}_agreement"]) for s in ("semantic", "coarse"))
                                         for _, r in fid.iterrows()],
        "SNR dB": fid["waveform_snr_db"].map(lambda x: fmt_num(x, 1)),
        "within tolerance": ["yes" if w is True else "**NO** ⚠" if w is False else "" for w in fid["within_tolerance"]],
        "violations / reason": [md_escape(v or r or "") for v, r in zip(fid["violations"], fid["reason"])],
    })
    note = md_escape(tol.get("note") or "")
    return (f"## Fidelity vs {BASELINE}\n\nTolerance: {md_escape(tol_txt)}. {note}\n\n" + to_pipe_table(cells))


def repro_md(rep: pd.DataFrame | None) -> str:
    if rep is None or rep.empty:
        return ""
    cells = pd.DataFrame({
        "hardware": rep["hardware"].map(md_escape), "model": rep["model"].map(md_escape),
        "batch size": rep["batch_size"].astype(str), "variant": rep["variant"].map(md_escape),
        "reps": rep["reps"].astype(str), "median per rep, s": rep["medians_s"],
        "max/min − 1": rep["spread_pct"].map(fmt_pct), "< 5 %": rep["spread_below_5pct"].map({True: "yes", False: "**no**"}),
        "CIs overlap": rep["cis_overlap"].map({True: "yes", False: "**no**"})})
    return ("## Reproducibility\n\nEach repetition is a fresh process running the full protocol; the spread is the "
            "relative difference between the largest and the smallest per-repetition median.\n\n" + to_pipe_table(cells))


def overhead_md(df: pd.DataFrame | None) -> str:
    if df is None or df.empty:
        return ""
    cells = pd.DataFrame({
        "hardware": df["hardware"].map(md_escape), "model": df["model"].map(md_escape),
        "batch size": df["batch_size"].astype(str), "variant": df["variant"].map(md_escape),
        "plain median s": df["plain_median_s"].map(fmt_num), "instrumented median s": df["instrumented_median_s"].map(fmt_num),
        "overhead [95 % CI]": [f"{fmt_pct(c)} [{fmt_pct(lo)}, {fmt_pct(hi)}]" for c, lo, hi in
                               zip(df["overhead_pct"], df["ci95_low_pct"], df["ci95_high_pct"])],
        "within noise": df["within_noise"].map({True: "yes", False: "no"}),
        "timer cost, direct": [f"{x:.4f} %" if _isnum(x) else "" for x in df["timer_cost_pct"]]})
    direct = df["timer_cost_pct"].dropna()
    verdict = ""
    if len(direct):
        worst = direct.max()
        verdict = (f" Measured directly (the stage methods of a stand-in model called with and without the timers), "
                   f"the timers cost at most {worst:.4f} % of a call's latency: "
                   + ("under the 1 % budget." if worst < 1 else "**over the 1 % budget**."))
    return ("## Instrumentation overhead\n\nLatency of the instrumented runs (per-stage timers on) against plain runs "
            "without stage timers, same configuration, in separate processes: this comparison is bounded by "
            "run-to-run noise (see the reproducibility section)." + verdict + "\n\n" + to_pipe_table(cells))


def write_fragments(gen_dir, build, run_paths, figure_names, fidelity=None, repro=None, overhead_paths=(),
                    reference=None, config=None) -> list[Path]:
    """Write every `_generated/*.md` fragment the .qmd includes; optional ones are empty without inputs.

    WAVs of ok runs are copied to `<build>/audio/` for embedding.
    """
    gen_dir = Path(gen_dir)
    gen_dir.mkdir(parents=True, exist_ok=True)
    raw = [_read_json(p) for p in run_paths]
    runs = load_runs(run_paths)
    rel = relative_table(runs)
    protocol = protocol_md(raw)
    if config is not None and Path(config).is_file():
        text = Path(config).read_text()
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        protocol += (f"\nEffective configuration (config hash `{digest}`, sha256 of this text):\n\n"
                     f"````yaml\n{text.strip()}\n````\n")
    fragments = {
        "warning": warning_md(raw),
        "findings": findings_md(runs, rel, fidelity),
        "unavailable": unavailable_md(runs),
        "protocol": protocol,
        "provenance": provenance_md(raw),
        "tables": tables_md(runs),
        "figures": figures_md(figure_names),
        "stages": stages_md(runs),
        "fidelity": fidelity_md(fidelity),
        "repro": repro_md(repro),
        "overhead": overhead_md(overhead_table(overhead_paths, runs) if overhead_paths else None),
        "comparison": comparison_md(reference, runs, rel),
        "audio": audio_md(runs, Path(build)),
    }
    paths = []
    for name, text in fragments.items():
        path = gen_dir / f"{name}.md"
        path.write_text(text + "\n", encoding="utf-8")
        paths.append(path)
    return paths


# ---------------------------------------------------------------- rendering

def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def render_report(qmd_path, results_dir, out_html, *, config=None, run_paths=None, figures_dir=None,
                  fidelity_paths=None, repro_paths=None, overhead_paths=None, reference_csv=None,
                  title: str | None = None, renderer: str | None = None, keep_build: bool = False) -> Path:
    """Render `qmd_path` with the data under `results_dir` into the self-contained HTML file `out_html`.

    Inputs not given explicitly are found in the results layout (`aggregate.find_inputs`): run JSONs
    `<hw>/<model>/<variant>/bs<N>.json` (their WAVs are embedded), `fidelity/*.json`, `repro/<variant>/rep<K>.json`,
    and plain (`instrumented: false`) runs `overhead/<variant>/bs<N>.json`; optional sections appear only with data.
    - figures_dir: folder with the PNGs of `figures.make_figures`; default `<results_dir>/figures` when it holds
      them, else they are drawn here.
    - config: optional config file, shown verbatim in the protocol section.
    - reference_csv: published 2023 results; default `<qmd folder>/reference/published_results.csv`.
    - renderer: "quarto" or "pandoc"; default `find_renderer()`.
    The build happens in a temporary folder beside `out_html`; the result is moved into place atomically.
    """
    qmd_path, out_html = Path(qmd_path), Path(out_html)
    src = qmd_path.parent
    found = find_inputs(results_dir) if results_dir is not None else {}
    run_paths = [Path(p) for p in (run_paths if run_paths is not None else found.get("runs", []))]
    fidelity_paths = fidelity_paths if fidelity_paths is not None else found.get("fidelity", [])
    repro_paths = repro_paths if repro_paths is not None else found.get("repro", [])
    overhead_paths = overhead_paths if overhead_paths is not None else found.get("overhead", [])
    if not run_paths:
        raise ValueError(f"no run JSONs found in {results_dir}")
    if figures_dir is None and results_dir is not None and all((Path(results_dir) / "figures" / n).is_file() for n in FIGURES):
        figures_dir = Path(results_dir) / "figures"
    renderer = renderer or find_renderer()
    out_html.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".report-build-", dir=out_html.parent))
    try:
        shutil.copyfile(qmd_path, build / "report.qmd")
        shutil.copyfile(src / "report.css", build / "report.css")
        (build / "filters").mkdir()
        shutil.copyfile(src / "filters" / "quarto-compat.lua", build / "filters" / "quarto-compat.lua")
        fidelity = load_fidelity(fidelity_paths) if fidelity_paths else None
        figs = build / "figures"
        if figures_dir is None:
            make_figures(load_runs(run_paths), figs, fidelity)
        else:
            figs.mkdir()
            for name in FIGURES:
                if (Path(figures_dir) / name).is_file():
                    shutil.copyfile(Path(figures_dir) / name, figs / name)
        names = [n[:-4] for n in FIGURES if (figs / n).is_file()]
        reference_csv = Path(reference_csv) if reference_csv else src / "reference" / "published_results.csv"
        write_fragments(build / "_generated", build, run_paths, names, fidelity=fidelity,
                        repro=repro_table(repro_paths) if repro_paths else None, overhead_paths=overhead_paths,
                        reference=pd.read_csv(reference_csv) if reference_csv.is_file() else None, config=config)
        if renderer == "quarto":
            cmd = ["quarto", "render", "report.qmd", "--to", "html", "--output", "report.html"]
            cmd += ["-M", f"title:{title}"] if title else []
        else:
            import pypandoc

            cmd = [pypandoc.get_pandoc_path(), "report.qmd", "--from", "markdown", "--to", "html5", "--standalone",
                   "--embed-resources", "--lua-filter", "filters/quarto-compat.lua", "--css", "report.css", "--toc",
                   "--columns", "1000", "--output", "report.html"]
            cmd += ["--metadata", f"title={title}"] if title else []
        _run(cmd, build)
        os.replace(build / "report.html", out_html)
    finally:
        if not keep_build:
            shutil.rmtree(build, ignore_errors=True)
    return out_html
