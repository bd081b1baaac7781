"""Tidy pandas tables from result records: runs, absolute, relative (like for like only), fidelity,
reproducibility, stage-timer overhead and the cross-hardware view. Every statistic of the report is
computed here, once; the Markdown fragments and the figures only read these tables."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as _sps

from . import calibration, layout, stats, trackers, variants
from .markdown import isnum
from .legacy import PREFIX as LEGACY_PREFIX, baseline_for, stack_baseline, today_counterpart
from .records import FaultSuite, FidelityResult, ResultError, RunResult, hardware_folder

STAGES = ("semantic", "coarse", "fine", "decode")
DECODING_STAGES = trackers.DECODING_STAGES
FLOOR_STAGES = ("semantic", "coarse", "fine")  # EnCodec's decode has no floor (barkbench.calibration)
MB = 1e6  # 1 MB = 10^6 bytes, as the 2023 study
REPRO_TOLERANCE = 0.05  # largest relative spread of per-repetition medians called reproducible
# What two runs must share for a relative change between them to mean anything (besides hardware,
# model and batch size, which group them): a difference is named in the table instead of a number.
LIKE_FOR_LIKE = ("weights", "model_id", "protocol", "versions", "instrumented")
VERSION_KEYS = ("python", "torch", "transformers", "accelerate", "optimum")
GROUP = ["hardware", "model", "batch_size"]


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def _attr(record, name: str, default=np.nan):
    """An attribute of a nested measure that may be missing (None: the run measured nothing)."""
    return default if record is None else getattr(record, name)


def _median(xs):
    xs = [x for x in (xs or []) if x is not None]
    return float(np.median(xs)) if xs else np.nan


# ---------------------------------------------------------------- reading the declared files

def _check_place(rec: RunResult, path: Path, root, baseline: str | None = None) -> str:
    """The hardware folder of a run file; its content must be what its place in the layout says (a control
    file holds the baseline)."""
    folder = hardware_folder(path, root)
    model, variant, bs = layout.slug(rec.model["requested"]), rec.variant["name"], rec.protocol["batch_size"]
    rel = Path(path).resolve().relative_to(Path(root).resolve()).parts
    if rel[2] == layout.CONTROL_DIR:
        expected = (model, layout.CONTROL_DIR, f"bs{bs}")
        if baseline is not None and variant != baseline:
            raise ResultError(f"{path}: an A/A control file holds {variant}, not the baseline {baseline}")
    elif rel[2] in layout.RESERVED:  # <model>/repro/<variant>/rep<K>.json, <model>/overhead/<variant>/bs<N>.json
        expected = (model, rel[2], variant)
    else:
        expected = (model, variant, f"bs{bs}")
    name = f"bs{bs}.json" if rel[2] == layout.OVERHEAD_DIR else r"rep\d+\.json"
    if tuple(rel[1:4]) != expected or not re.fullmatch(name, rel[-1]) or len(rel) != 5:
        raise ResultError(f"{path}: holds {rec.model['requested']} / {variant} / batch size {bs}, "
                          f"not what its place in the results layout says")
    return folder


def read_runs(paths, root, baseline: str | None = None) -> list[tuple[str, Path, RunResult]]:
    out = []
    for p in map(Path, paths):
        rec = RunResult.from_json(p)
        out.append((_check_place(rec, p, root, baseline), p, rec))
    return out


def _in_its_place(path: Path, root, expected: tuple, holds: str) -> str:
    """The hardware folder of a record that lies where the results layout puts what it holds (`expected`: its
    path's parts after the hardware folder); else one line naming the file and what it holds."""
    folder = hardware_folder(path, root)
    if path.resolve().relative_to(Path(root).resolve()).parts[1:] != expected:
        raise ResultError(f"{path}: holds {holds}, not what its place in the results layout says")
    return folder


def read_fidelity(paths, root) -> list[tuple[str, Path, FidelityResult]]:
    """Fidelity records, each holding what its place says: <hardware>/<model>/fidelity/<variant>.json."""
    out = []
    for p in map(Path, paths):
        rec = FidelityResult.from_json(p)
        expected = (layout.slug(rec.model["requested"]), layout.FIDELITY_DIR, f"{rec.variant}.json")
        out.append((_in_its_place(p, root, expected, f"the fidelity of {rec.variant} ({rec.model['requested']})"),
                    p, rec))
    return out


def faults_table(paths, root) -> pd.DataFrame:
    """One row per case of each fault-suite record (`barkbench.faults`), each record where the layout puts the
    suite of its model: <hardware>/<model>/faults.json."""
    rows = []
    for p in map(Path, paths):
        rec = FaultSuite.from_json(p)
        folder = _in_its_place(p, root, (layout.slug(rec.model), Path(layout.FAULTS).name),
                               f"the fault suite of {rec.model}")
        for r in rec.rows:
            rows.append({"hardware": folder, "model": rec.model, "model_id": rec.model_id, "weights": rec.weights,
                         "device": rec.device, "tokens": rec.tokens,
                         "inputs": rec.inputs, "git_commit": rec.git_commit, **r})
    return pd.DataFrame(rows)


def check_against_config(config: dict, *record_lists) -> None:
    """Every record measured with this config: its model among the config's, its protocol the config's for
    its device, its config hash this config's, and one weights kind (and checkpoint) per hardware and model.
    The first record that does not match is refused with one line naming its file."""
    from .confighash import config_hash

    weights: dict[tuple, tuple] = {}
    for records in record_lists:
        for folder, path, rec in records:
            device = "cuda" if str(rec.device.get("type", "")).startswith("cuda") else "cpu"
            if rec.model["requested"] not in config["models"]:
                raise ResultError(f"{path}: measured {rec.model['requested']}, not a model of this config "
                                  f"({', '.join(config['models'])})")
            want = {**config["protocol"][device], **config["protocol"]["sampling"]}
            diff = [k for k, v in want.items() if rec.protocol.get(k) != v]
            if diff:
                raise ResultError(f"{path}: measured with another protocol ({'; '.join(f'{k} {rec.protocol.get(k)!r} vs {want[k]!r}' for k in diff)[:200]}): re-measure it or remove it")
            expected = config_hash(config, device)
            if rec.config_hash != expected:
                raise ResultError(f"{path}: measured with config hash {rec.config_hash}, this config's is {expected} "
                                  "(protocol, prompts, offline fallback): re-measure it or remove it")
            if rec.status == "ok":
                kind = (rec.model.get("weights"), rec.model.get("id"))
                first = weights.setdefault((folder, rec.model["requested"]), kind)
                if kind != first:
                    raise ResultError(f"{path}: {kind[0]} weights ({kind[1]}), while other results of {folder} · "
                                      f"{rec.model['requested']} used {first[0]} weights ({first[1]})")


def check_one_machine_per_folder(*record_lists) -> dict[str, str]:
    """{hardware folder: the machine id measured inside its jobs}; a folder of several machines is an error."""
    seen: dict[str, dict[str, int]] = {}
    for records in record_lists:
        for folder, _, rec in records:
            hw = rec.hardware.get("id")
            seen.setdefault(folder, {}).setdefault(hw, 0)
            seen[folder][hw] += 1
    for folder, ids in seen.items():
        if len(ids) > 1:
            listed = ", ".join(f"{hw} ({n} files)" for hw, n in ids.items())
            raise ResultError(f"results folder {folder!r} holds results measured on {len(ids)} machines: {listed}; "
                              "keep one folder per machine")
    return {folder: next(iter(ids)) for folder, ids in seen.items()}


# ---------------------------------------------------------------- runs

def _protocol_key(protocol: dict) -> str:
    return json.dumps({k: v for k, v in sorted(protocol.items()) if k != "batch_size"})


CONTROL = "control"  # the variant column of the A/A control cell (the baseline measured again as its own cell)


def _process_of(path: Path) -> int:
    """K of a `rep<K>.json` (the round the process ran in); 1 for a file of a single process."""
    m = re.fullmatch(r"rep(\d+)\.json", path.name)
    return int(m.group(1)) if m else 1


def run_row(folder: str, path: Path, rec: RunResult, baseline: str) -> dict:
    it, summ = rec.iterations, rec.summary.latency_s if rec.summary else None
    mem, thr, timing = rec.memory, rec.throughput, rec.timing
    device = rec.device.get("type", "")
    cuda, anon, rss = (_attr(mem, k, None)
                       for k in ("cuda_peak_allocated_bytes", "peak_anon_rss_bytes", "peak_rss_bytes"))
    if device == "cuda" and cuda is not None:
        peak, kind = cuda, "CUDA peak allocated"
    elif anon is not None:
        peak, kind = anon, "peak anonymous RSS"
    else:
        peak, kind = rss, "peak RSS"
    lat = [float(x) for x in _attr(it, "latency_s", None) or []]
    sem = [int(x) for x in _attr(it, "semantic_tokens", None) or []]
    wav = _get(rec.audio, "wav")
    row = {
        "hardware": folder, "hardware_id": rec.hardware.get("id"), "model": rec.model["requested"],
        "model_id": rec.model.get("id"), "weights": rec.model.get("weights"),
        "variant": CONTROL if path.parent.parent.name == layout.CONTROL_DIR else rec.variant["name"],
        "process": _process_of(path),
        "optimizations": "+".join(rec.variant.get("optimizations") or []),
        "baseline": baseline, "batch_size": int(rec.protocol["batch_size"]), "status": rec.status,
        "reason": rec.reason, "device": device, "instrumented": bool(rec.instrumented),
        "protocol": _protocol_key(rec.protocol),
        "versions": " ".join(f"{k}={rec.versions.get(k)}" for k in VERSION_KEYS if rec.versions.get(k)),
        "git_commit": rec.git_commit, "length_mode": rec.protocol.get("length_mode"),
        "max_new_tokens": rec.protocol.get("max_new_tokens"), "n": int(_attr(summ, "n", len(lat))),
    }
    for key in ("median", "mean", "std", "cv", "min", "max", "p10", "p90", "ci_low", "ci_high"):
        row[f"latency_{key}"] = _attr(summ, key, None) if _attr(summ, key, None) is not None else np.nan
    row["latency_ci_method"] = _attr(summ, "ci_method", None)
    row.update({
        "memory_kind": kind if peak is not None else None,
        "peak_memory_mb": peak / MB if peak is not None else np.nan,
        "weights_mb": (_attr(mem, "weights_bytes", None) or np.nan) / MB,
        "samples_per_s": _attr(thr, "samples_per_s"), "audio_s_per_s": _attr(thr, "audio_s_per_s"),
        "rtf": _attr(thr, "rtf"),
        "load_s": _attr(timing, "load_s"), "compile_s": _attr(timing, "compile_s", None) or np.nan,
        "first_call_overhead_s": _attr(timing, "first_call_overhead_s"),
        "first_call_s": _attr(timing, "first_call_s"),
        "stopped_by": _attr(timing, "stopped_by", None), "timed_s": _attr(timing, "timed_s"),
        "stage_timer_overhead_s": _attr(timing, "stage_timer_overhead_s", None) or np.nan,
    })
    extra = rec.extra or {}
    row.update(energy_cells(extra.get("energy")))
    row.update(compiled_cells(extra.get("compiled")))
    stages = _attr(it, "stages", None) or {}
    for st in STAGES:
        row[f"stage_{st}_s"] = _median(_attr(stages.get(st), "seconds", None))
        row[f"stage_{st}_tokens"] = _median(_attr(stages.get(st), "tokens", None))
    for st in DECODING_STAGES:  # their decode steps apart from the prefill (trackers.DecodeSteps)
        row[f"stage_{st}_decode_s"] = _median(_attr(stages.get(st), "decode_seconds", None))
        steps = [n for n in (_attr(stages.get(st), "decode_steps", None) or []) if n]
        row[f"stage_{st}_decode_steps"] = float(np.median(steps)) if steps else np.nan
        positions = _attr(stages.get(st), "decode_cache_positions", None) or []
        row[f"stage_{st}_decode_cache_positions"] = (
            float(np.median(positions)) if positions and None not in positions else np.nan)
    # the machine's floor of each stage, from this run's own calibration and stage work (barkbench.calibration):
    # semantic and coarse, of their decode steps, at the read bandwidth measured between the timed calls, and fine at
    # the GEMM throughput of its format measured there (the job's start calibration where a record has none)
    cal = rec.hardware.get("calibration")
    probes = _attr(it, "read_bandwidth_bytes_per_s", None)
    start_bandwidth = cal["read_bandwidth_bytes_per_s"] if cal else None
    if cal and probes:
        cal = {**cal, "read_bandwidth_bytes_per_s": float(np.median(probes))}
    gemm_probes, fine_format = _attr(it, "fine_gemm_flops_per_s", None), calibration.fine_gemm_format(
        rec.model.get("stage_work"))
    if cal and gemm_probes and fine_format:
        cal = {**cal, "gemm_flops_per_s": {**cal["gemm_flops_per_s"], fine_format: float(np.median(gemm_probes))}}
    floors = calibration.stage_floors(rec.model.get("stage_work"), cal, _floor_steps(row),
                                      {st: row[f"stage_{st}_decode_cache_positions"] for st in DECODING_STAGES},
                                      row["batch_size"])
    for st, floor in floors.items():
        row[f"stage_{st}_floor_s"] = floor if floor is not None else np.nan
    matmuls = rec.model.get("decode_matmuls") or {}
    for st in DECODING_STAGES:  # the decode steps' matmuls alone (calibration.decode_matmuls_seconds), per step
        one = (matmuls.get(st) or {}).get("seconds")
        row[f"stage_{st}_matmuls_s"] = one * row[f"stage_{st}_decode_steps"] if one is not None else np.nan
    _multiples_of_floors(row)
    row["cpu_features"] = " ".join(rec.hardware.get("cpu_features") or [])
    row["cpu_isa_ceiling"] = rec.hardware.get("cpu_isa_ceiling") or ""  # barkbench.isa: this CPU run as an older one
    row["read_bandwidth_gb_s"] = cal["read_bandwidth_bytes_per_s"] / 1e9 if cal else np.nan  # the floors'
    row["read_bandwidth_start_gb_s"] = start_bandwidth / 1e9 if start_bandwidth else np.nan
    for fmt in calibration.GEMM_FORMATS:  # before loading, and the fine floor's where this run's fine stage has it
        row[f"gemm_{fmt}_gflop_s"] = rec.hardware["calibration"]["gemm_flops_per_s"][fmt] / 1e9 if cal else np.nan
        row[f"gemm_{fmt}_between_gflop_s"] = (cal["gemm_flops_per_s"][fmt] / 1e9 if cal and gemm_probes
                                              and fmt == fine_format else np.nan)
    row.update({
        "semantic_len_median": float(np.median(sem)) if sem else np.nan,
        "wav": str(path.parent / wav) if wav else None,
        "latency_s": json.dumps(lat),  # per-iteration values, JSON-encoded so the CSV round-trips
        "semantic_lengths": json.dumps(sem),
        "path": str(path),
    })
    return row


def energy_cells(energy: dict | None) -> dict:
    """Energy columns of a run (barkbench.energy.record); energy_counter None: the machine had none."""
    energy = energy or {}
    return {"energy_counter": energy.get("counter"), "energy_scope": energy.get("scope"),
            "joules_per_sample": energy.get("joules_per_sample") or np.nan,
            "joules_per_audio_s": energy.get("joules_per_audio_s") or np.nan}


def compiled_cells(compiled: dict | None) -> dict:
    """What torch.compile did in a compiled run (barkbench.compile_counters.summary); NaN for other runs."""
    if not compiled:
        return {"cuda_graph_replays_per_call": np.nan, "cuda_graph_skips": np.nan, "recompiles_timed": np.nan,
                "cuda_graph_skip_reasons": None}
    return {"cuda_graph_replays_per_call": compiled.get("cuda_graph_replays_per_call") or 0.0,
            "cuda_graph_skips": compiled["cuda_graph_skips"], "recompiles_timed": compiled["recompiles_timed"],
            "cuda_graph_skip_reasons": json.dumps(compiled["cuda_graph_skip_reasons"])}


def runs_table(records, baseline: str) -> pd.DataFrame:
    """One row per process (result file)."""
    df = pd.DataFrame([run_row(f, p, r, baseline) for f, p, r in records])
    if df.empty:
        return df
    order = {v: i for i, v in enumerate(variant_order(df["variant"], baseline))}
    df = df.assign(_o=df["variant"].map(order)).sort_values(["hardware", "model", "batch_size", "_o", "process"])
    return df.drop(columns="_o").reset_index(drop=True)


def variant_order(variants, baseline: str) -> list[str]:
    """Baseline first, then its A/A control, then alphabetical."""
    uniq = sorted(set(variants))
    head = [v for v in (baseline, CONTROL) if v in uniq]
    return head + [v for v in uniq if v not in head]


def json_list(row, column) -> list:
    """A list column of a table row (JSON text in the CSV; empty when missing)."""
    val = row[column]
    return json.loads(val) if isinstance(val, str) and val else []


def latencies(row) -> list[float]:
    return [float(x) for x in json_list(row, "latency_s")]


CELL = GROUP + ["variant"]
# Status of a cell none of whose processes is ok: the first of these that one of them has.
CELL_STATUS = ("not_applicable", "too_slow", "failed")


def _cell_row(g: pd.DataFrame) -> dict:
    ok = g[g["status"] == "ok"]
    row = (ok if len(ok) else g).iloc[0].to_dict()  # the first process: a compile variant's cold compile
    row.pop("process", None)
    calls = [len(latencies(r)) for _, r in ok.iterrows()]
    means = [None] * int(g["process"].max())
    for _, r in ok.iterrows():
        means[int(r["process"]) - 1] = float(stats.process_means([latencies(r)])[0])
    within = stats.Within.from_calls([latencies(r) for _, r in ok.sort_values("process").iterrows()])
    row.update(processes=len(ok), processes_declared=len(g), calls_per_process=json.dumps(calls),
               calls_x_processes=(f"{calls[0]}×{len(ok)}" if calls and len(set(calls)) == 1
                                  else "+".join(map(str, calls))),
               process_log_means=json.dumps(means),
               within_log_var=within.s2 if within.df else np.nan, within_df=within.df,
               within_calls=json.dumps(list(within.calls)),
               process_notes="; ".join(f"process {int(r['process'])}: {r['status']}"
                                       + (f" ({r['reason']})" if isinstance(r["reason"], str) else "")
                                       for _, r in g[g["status"] != "ok"].iterrows()))
    if ok.empty:
        row["status"] = next((st for st in CELL_STATUS if (g["status"] == st).any()), g["status"].iloc[0])
        row["reason"] = next((r for st, r in zip(g["status"], g["reason"]) if st == row["status"]), None)
        return row
    row.update(status="ok", reason=None, n=int(sum(calls)),
               latency_s=json.dumps([x for _, r in ok.iterrows() for x in latencies(r)]))
    allcalls = np.asarray(latencies(row))
    row.update(latency_median=float(np.median(allcalls)), latency_mean=float(np.mean(allcalls)),
               latency_min=float(allcalls.min()), latency_max=float(allcalls.max()),
               latency_cv=float(np.std(allcalls, ddof=1) / np.mean(allcalls)) if allcalls.size > 1 else np.nan)
    for col in ("peak_memory_mb", "samples_per_s", "audio_s_per_s", "rtf", "load_s", "timed_s",
                "joules_per_sample", "joules_per_audio_s",
                *[f"stage_{st}_s" for st in STAGES], *[f"stage_{st}_tokens" for st in STAGES],
                *[f"stage_{st}_{x}" for st in DECODING_STAGES
                  for x in ("decode_s", "decode_steps", "decode_cache_positions")],
                *[f"stage_{st}_floor_s" for st in FLOOR_STAGES],
                *[f"stage_{st}_matmuls_s" for st in DECODING_STAGES]):
        if col in ok:
            row[col] = float(np.nanmedian(ok[col].astype(float))) if ok[col].notna().any() else np.nan
    _multiples_of_floors(row)  # the cell's multiple of its floor, from the cell's own medians
    return row


def _floor_steps(row) -> dict:
    """What each floor counts: semantic and coarse, their decode steps; fine, its codes."""
    return {**{st: row[f"stage_{st}_decode_steps"] for st in DECODING_STAGES}, "fine": row["stage_fine_tokens"]}


def _multiples_of_floors(row) -> None:
    """Measured time ÷ floor: semantic and coarse, of their decode steps; fine, of the stage."""
    for st in FLOOR_STAGES:
        floor = row.get(f"stage_{st}_floor_s")
        measured = row.get(f"stage_{st}_decode_s" if st in DECODING_STAGES else f"stage_{st}_s")
        row[f"stage_{st}_x_floor"] = measured / floor if isnum(floor) and floor > 0 and isnum(measured) else np.nan
        if st in DECODING_STAGES:
            alone = row.get(f"stage_{st}_matmuls_s")
            row[f"stage_{st}_matmuls_x_floor"] = (alone / floor if isnum(floor) and floor > 0 and isnum(alone)
                                                  else np.nan)


def within_of(row) -> stats.Within:
    """The calls within a cell's processes (a single plain process, e.g. the overhead check's: its own calls)."""
    if isinstance(row.get("within_calls"), str):
        return stats.Within(s2=float(row["within_log_var"]), df=int(row["within_df"]),
                            calls=tuple(json.loads(row["within_calls"])))
    return stats.Within.from_calls([latencies(row)])


def _cell_key(row) -> tuple:
    return (row["model"], int(row["batch_size"]), row["variant"])


def pooled_noise(cells: pd.DataFrame) -> dict[str, dict]:
    """Per hardware folder (one run): the noise model of its ok, instrumented cells
    (`stats.pooled_process_variance`, rounds as blocks, each cell's per-call variance), with `index`: where
    each cell (model, batch size, variant) sits in it."""
    out = {}
    if cells.empty:
        return out
    for hw, g in cells.groupby("hardware", sort=False):
        ok = g[(g["status"] == "ok") & g["instrumented"]]
        means = [[np.nan if m is None else m for m in json.loads(x)] for x in ok["process_log_means"]]
        out[hw] = stats.pooled_process_variance(means, [within_of(r) for _, r in ok.iterrows()])
        out[hw]["index"] = {_cell_key(r): i for i, (_, r) in enumerate(ok.iterrows())}
    return out


def noise_side(row, pooled: dict) -> tuple:
    """(Within, index in the run's fit) of a row: what `stats.process_change` needs of each side."""
    idx = pooled.get("index", {}).get(_cell_key(row)) if isinstance(row.get("process_log_means"), str) else None
    return within_of(row), idx


def adjusted_means(row, pooled: dict) -> np.ndarray:
    """A cell's process means (log) with the round effects of its run taken out."""
    effect = pooled["round_effect"]
    return np.array([m - (effect[k] if k < len(effect) else 0.0)
                     for k, m in enumerate(json.loads(row["process_log_means"])) if m is not None])


def cells_table(procs: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """One row per cell (hardware x model x batch size x variant, the A/A control its own cell): its processes
    together, with the geometric-mean latency and its interval on the run's pooled between-process variance."""
    if procs.empty:
        return procs
    rows = [_cell_row(g) for _, g in procs.groupby(CELL, sort=False)]
    cells = pd.DataFrame(rows)
    pooled = pooled_noise(cells)
    for col in ("latency_gmean", "latency_ci_low", "latency_ci_high", "latency_ci_level", "latency_ci_df"):
        cells[col] = np.nan
    cells["latency_ci_method"] = None
    for i, r in cells.iterrows():
        if r["status"] != "ok" or not r["instrumented"]:
            continue
        p = pooled[r["hardware"]]
        lv = stats.process_level(adjusted_means(r, p), p, noise_side(r, p))
        cells.loc[i, ["latency_gmean", "latency_ci_level", "latency_ci_df"]] = [lv["gmean"], lv["ci_level"], lv["df"]]
        if lv["ci_low"] is not None:
            cells.loc[i, ["latency_ci_low", "latency_ci_high"]] = [lv["ci_low"], lv["ci_high"]]
            cells.loc[i, "latency_ci_method"] = "t interval of the geometric mean over processes"
        else:
            cells.loc[i, "latency_ci_method"] = "no interval: no cell of this run has two processes"
    return cells.reset_index(drop=True)


def noise_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The check of the noise model: each cell's own spread of process means (rounds taken out) beside the spread
    the model gives it (the run's between-process variance plus the cell's per-call variance over its calls), and
    the chance of a spread at least that large under the model ((k - 1) s^2 / model^2 ~ chi^2 with k - 1 df)."""
    pooled = pooled_noise(cells)
    rows = []
    for hw, p in pooled.items():
        g = cells[(cells["hardware"] == hw) & (cells["status"] == "ok") & cells["instrumented"]]
        tau2 = max(0.0, p.get("tau2", np.nan)) if p["df"] else np.nan
        for _, r in g.iterrows():
            a, w = adjusted_means(r, p), within_of(r)
            model_var = tau2 + (w.s2 * w.inv_calls / len(w.calls) if w.df else 0.0)
            obs = float(np.var(a, ddof=1)) if a.size >= 2 else np.nan
            rows.append({"hardware": hw, "model": r["model"], "batch_size": r["batch_size"], "variant": r["variant"],
                         "processes": int(a.size), "calls_x_processes": r["calls_x_processes"],
                         "cell_sd_pct": 100 * math.sqrt(obs) if np.isfinite(obs) else np.nan,
                         "model_sd_pct": 100 * math.sqrt(model_var) if np.isfinite(model_var) else np.nan,
                         "per_call_sd_pct": 100 * math.sqrt(w.s2) if w.df else np.nan,
                         "between_sd_pct": 100 * math.sqrt(tau2) if np.isfinite(tau2) else np.nan, "df": p["df"],
                         "round_effects_pct": json.dumps([round(100 * x, 2) for x in p["round_effect"]]),
                         "spread_p": (float(_sps.chi2.sf((a.size - 1) * obs / model_var, a.size - 1))
                                      if np.isfinite(obs) and model_var > 0 else np.nan)})
    return pd.DataFrame(rows)


def absolute_table(runs: pd.DataFrame) -> pd.DataFrame:
    cols = GROUP + ["variant", "status", "reason", "n", "processes", "calls_x_processes", "latency_gmean",
                    "latency_ci_low", "latency_ci_high", "latency_ci_level", "latency_ci_df", "latency_median",
                    "latency_min", "latency_max", "latency_ci_method", "latency_cv", "peak_memory_mb", "memory_kind",
                    "samples_per_s", "rtf", "first_call_overhead_s", "compile_s", "stopped_by",
                    "energy_counter", "joules_per_sample", "joules_per_audio_s",
                    "cuda_graph_replays_per_call", "cuda_graph_skips", "cuda_graph_skip_reasons", "recompiles_timed",
                    "process_notes"]
    return runs.reindex(columns=cols).reset_index(drop=True)


def calibration_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per hardware: median and range over its runs of the calibration each run measured (the floors' read bandwidth,
    and each format's GEMM over the runs whose fine stage has it: between the timed calls, each run's median; the
    rest before loading)."""
    cols = (["read_bandwidth_gb_s", "read_bandwidth_start_gb_s"]
            + [f"gemm_{f}_{when}gflop_s" for f in calibration.GEMM_FORMATS for when in ("", "between_")])
    have = runs[runs[cols[0]].notna()] if cols[0] in runs else runs.iloc[0:0]
    rows = []
    for hw, g in have.groupby("hardware", sort=False):
        row = {"hardware": hw, "runs": len(g)}
        for c in cols:
            row.update({f"{c}_median": g[c].median(), f"{c}_min": g[c].min(), f"{c}_max": g[c].max()})
        rows.append(row)
    return pd.DataFrame(rows)


def cpu_guidance_table(runs: pd.DataFrame, relative: pd.DataFrame) -> pd.DataFrame:
    """Per CPU hardware, model and batch size: the fastest variant whose fidelity verdict is "within" (the relative
    table's like-for-like verdict, `with_fidelity`; the baseline counts as within, its A/A control does not
    compete), its speedup, and the variants that cannot pay off on this CPU's features (`pays_off_on`)."""
    rows = []
    cpu = runs[(runs["device"] == "cpu") & (runs["variant"] != CONTROL)] if len(runs) else runs
    for (hw, model, bs), g in cpu.groupby(GROUP, sort=False):
        features = next((f.split() for f in g["cpu_features"] if isinstance(f, str)), [])
        ceiling = next((c for c in g.get("cpu_isa_ceiling", []) if isinstance(c, str) and c), "")
        rel = relative[(relative["hardware"] == hw) & (relative["model"] == model) & (relative["batch_size"] == bs)
                       & (relative["variant"] != CONTROL)] if len(relative) else relative
        ok = rel[rel["fidelity"].isin(["within", "baseline"]) & rel["speedup"].notna()] if len(rel) else rel
        best = ok.loc[ok["speedup"].idxmax()] if len(ok) else None
        cannot = {}
        for v in g["variant"]:
            try:
                reason = variants.parse(v).pays_off_on(features)
            except variants.VariantError:
                continue
            if reason:
                cannot[v] = reason
        cell = g[g["variant"] == best["variant"]] if best is not None else g.iloc[:0]
        rows.append({"hardware": hw, "model": model, "batch_size": bs, "cpu_features": " ".join(features),
                     "cpu_isa_ceiling": ceiling, "fastest_within_limits": best["variant"] if best is not None else None,
                     "latency_median": cell["latency_gmean"].iloc[0] if len(cell) else np.nan,
                     "speedup": best["speedup"] if best is not None else np.nan,
                     "cannot_pay_off": json.dumps(cannot)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- like for like

def difference(a, b, keys=LIKE_FOR_LIKE) -> str | None:
    """What keeps runs `a` and `b` (rows of the runs table) from being compared; None when like for like."""
    for key in keys:
        if a[key] != b[key]:
            if key == "protocol":
                pa, pb = json.loads(a[key]), json.loads(b[key])
                diff = [f"{k} {pa.get(k)!r} vs {pb.get(k)!r}" for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]
                return "protocol differs (" + "; ".join(diff)[:200] + ")"
            return f"{key.replace('_', ' ')} differs ({a[key]} vs {b[key]})"
    return None


def _log_means(row, pooled: dict) -> np.ndarray:
    """Process means (log) of a cell row, rounds taken out; a single plain process (overhead) as it is."""
    if isinstance(row.get("process_log_means"), str):
        return adjusted_means(row, pooled)
    return stats.process_means([latencies(row)])


def _change_cells(base, cand, pooled: dict) -> dict:
    """Change of cell `cand` vs cell `base` (rows) on their processes, with the run's pooled variance."""
    rc = stats.process_change(_log_means(base, pooled), _log_means(cand, pooled), pooled,
                              noise_side(base, pooled), noise_side(cand, pooled))
    pct = (lambda x: 100 * x if x is not None else np.nan)
    return {"latency_change_pct": pct(rc["change"]), "ci_low_pct": pct(rc["ci_low"]),
            "ci_high_pct": pct(rc["ci_high"]), "ci_level": rc["ci_level"], "ci_df": rc["df"],
            "ci_method": rc["method"], "within_noise": rc["within_noise"], "speedup": 1.0 / (1.0 + rc["change"]),
            "n_baseline": base.get("calls_x_processes") or f"{len(latencies(base))}×1",
            "n_variant": cand.get("calls_x_processes") or f"{len(latencies(cand))}×1"}


def relative_table(runs: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Change vs the baseline variant of the same hardware, model and batch size, like for like only.

    Latency: change of the geometric mean over processes with its t interval on the run's pooled
    between-process variance (`stats.process_change`); memory and throughput: ratios of the point values.
    The A/A control (the baseline as its own cell) is compared like any variant. A `too_slow` cell (stopped
    after its warm-up) gets a lower bound of its slowdown from the calls it made.
    """
    rows = []
    pooled_by_hw = pooled_noise(runs)
    for _, grp in runs.groupby(GROUP, sort=False):
        pooled = pooled_by_hw.get(grp["hardware"].iloc[0])
        base = grp[(grp["variant"] == baseline) & (grp["status"] == "ok") & grp["instrumented"]]
        base = base.iloc[0] if len(base) else None
        for _, r in grp.iterrows():
            row = {k: r[k] for k in GROUP + ["variant", "status", "reason"]}
            row.update(baseline=baseline, note="")
            why = None if base is None else difference(base, r)
            if r["status"] == "too_slow" and base is not None and (latencies(r) or np.isfinite(r["first_call_s"])):
                calls = latencies(r)  # the timed calls it made; none: its warm-up call
                per_call = float(np.median(calls)) if calls else float(r["first_call_s"])
                row.update(slowdown=per_call / base["latency_gmean"], calls_made=len(calls), note="too_slow")
            elif r["status"] != "ok":
                row["note"] = r["status"]
            elif base is None:
                row["note"] = f"no ok {baseline} run to compare with"
            elif why:
                row["note"] = f"not compared with {baseline}: {why}"
            elif r["variant"] == baseline:
                row.update(latency_change_pct=0.0, speedup=1.0, memory_change_pct=0.0, throughput_change_pct=0.0,
                           note="baseline")
            else:
                row.update(_change_cells(base, r, pooled),
                           memory_change_pct=100 * (r["peak_memory_mb"] / base["peak_memory_mb"] - 1),
                           throughput_change_pct=100 * (r["samples_per_s"] / base["samples_per_s"] - 1))
            rows.append(row)
    cols = GROUP + ["variant", "status", "reason", "baseline", "latency_change_pct", "ci_low_pct", "ci_high_pct",
                    "ci_level", "ci_df", "ci_method", "within_noise", "n_baseline", "n_variant", "speedup",
                    "slowdown", "calls_made", "memory_change_pct", "throughput_change_pct", "note"]
    return pd.DataFrame(rows).reindex(columns=cols)


def cross_hardware_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Absolute medians side by side, one column per hardware, one block per protocol (never a ratio)."""
    ok = runs[(runs["status"] == "ok") & runs["instrumented"]]
    if ok["hardware"].nunique() < 2:
        return pd.DataFrame()
    wide = ok.pivot_table(index=["protocol", "model", "model_id", "batch_size", "variant"], columns="hardware",
                          values=["latency_median", "peak_memory_mb", "samples_per_s"], aggfunc="first")
    wide.columns = [f"{metric}@{hw}" for metric, hw in wide.columns]
    return wide.reset_index()


# ---------------------------------------------------------------- quality checks

def _fidelity_reference_columns(rec) -> dict:
    """What a fidelity record was judged against, where its limits were measured, and the format's cost verdict."""
    ref, measured, cost, layers = rec.reference or {}, rec.limits_measured or {}, rec.format_cost or {}, rec.layers or {}
    return {"reference_formats": "+".join(ref.get("formats") or []) or None,
            "compared_with": ref.get("compared_with", "baseline"),
            "limits_measured": (f"{measured['device']}, {measured['weights']} weights, {', '.join(measured['models'])}; "
                                f"{measured['inputs']}") if measured else None,
            "limits_warning": measured.get("warning"),
            "layers_checked": layers.get("layers"), "layers_max_ratio": layers.get("max_ratio"),
            "cost_within_targets": cost.get("within_targets"), "cost_verdict_reason": cost.get("verdict_reason"),
            "cost_misses": "; ".join(cost.get("misses") or []) or None,
            "cost_codec_snr_reference": _get(cost, "codec_snr_db", "reference"),
            "cost_codec_snr_candidate": _get(cost, "codec_snr_db", "candidate")}


def fidelity_table(records) -> pd.DataFrame:
    """One row per (fidelity record, teacher-forced stage: semantic, coarse, fine[i]); the variant-level
    measures (verdict, tolerance, free-running, chain, codec, batched) repeat on each row of a record."""
    rows = []
    for folder, path, rec in records:
        base = {"hardware": folder, "hardware_id": rec.hardware.get("id"), "model": rec.model["requested"],
                "model_id": rec.model.get("id"), "weights": rec.model.get("weights"), "variant": rec.variant,
                "baseline": rec.baseline, "status": rec.status, "reason": rec.reason,
                "within_tolerance": rec.within_tolerance, "violations": "; ".join(rec.violations),
                "fidelity_versions": " ".join(f"{k}={rec.versions.get(k)}" for k in ("torch", "transformers")
                                              if rec.versions.get(k)),
                "tolerance": json.dumps(rec.tolerance),
                **{f"tol_{k}": v for k, v in rec.tolerance.items() if k != "note"}}
        base.update(_fidelity_reference_columns(rec))
        for name in ("semantic", "coarse"):
            path_ = _get(rec.free_running, name) or {}
            base.update({f"{name}_{k}": path_.get(k) for k in
                         ("prefix", "length", "agreement", "decisive_share", "decisive_mismatches",
                          "divergence_margin", "same_context_max_rel")})
            base[f"{name}_path_margin_median"] = _get(path_, "margin", "median")
        fd = _get(rec.chain, "fine_decisions") or {}
        base.update({"chain_codes_agreement": _get(rec.chain, "codes_agreement"),
                     "chain_snr_db": _get(rec.chain, "waveform_snr_db"), "chain_calls": fd.get("calls"),
                     "chain_judged_calls": fd.get("judged_calls"), "chain_decisive_share": fd.get("decisive_share"),
                     "chain_decisive_mismatches": fd.get("decisive_mismatches"),
                     "codec_untouched": _get(rec.codec, "untouched"), "codec_snr_db": _get(rec.codec, "snr_db")})
        padded = rec.padded_batch or {}
        base.update({"padded_rows": padded.get("padded_rows"), "padded_kl_mean": padded.get("kl_mean"),
                     "padded_max_abs": padded.get("max_abs"), "padded_max_rel": padded.get("max_rel"),
                     "padded_same_top1": padded.get("same_top1")})
        batch_rows = _get(rec.batched, "rows") or []
        base.update({"batched_size": _get(rec.batched, "batch_size"), "batched_tokens": _get(rec.batched, "tokens"),
                     "batched_min_agreement": min((r["agreement"] for r in batch_rows), default=None),
                     "batched_decisive_mismatches": sum(r["decisive_mismatches"] for r in batch_rows) if batch_rows else None,
                     "batched_max_rel": max((r["same_context_max_rel"] for r in batch_rows), default=None)})
        stages = rec.teacher_forced or {None: {}}
        for stage, st in stages.items():
            stage_limits = _get(rec.limits, stage) or _get(rec.limits, "all") or {}
            cost = {who: _get(rec.format_cost, who, stage) or {} for who in ("reference", "candidate")}
            rows.append({**base, "stage": stage,
                         **{f"tol_{k}": v for k, v in stage_limits.items() if k != "note"},
                         **{f"cost_{who}_{k}": v for who, c in cost.items() for k, v in (
                             ("kl_mean", c.get("kl_mean")), ("kl_mean_se", c.get("kl_mean_se")),
                             ("kl_p99", _get(c, "kl", "p99")), ("dp_p1", _get(c, "dp", "p1")),
                             ("dp_p99", _get(c, "dp", "p99")), ("dp_rms", _get(c, "dp", "rms")),
                             ("same_top1", c.get("same_top1")), ("same_top1_sigma", c.get("same_top1_sigma")))},
                         **{k: st.get(k) for k in ("positions", "kl_mean", "kl_p99", "kl_max", "same_top1",
                                                   "max_dp_top", "max_abs", "max_rel")},
                         "margin_median": _get(st, "margin", "median"), "margin_p10": _get(st, "margin", "p10")})
    return pd.DataFrame(rows)


def repro_table(records, baseline: str) -> pd.DataFrame:
    """Per (hardware, model, variant, batch size): medians of each fresh-process repetition and their spread."""
    reps = runs_table(records, baseline)
    rows = []
    if reps.empty:
        return pd.DataFrame()
    for (hw, model, bs, variant), g in reps.groupby(["hardware", "model", "batch_size", "variant"], sort=False):
        ok = g[g["status"] == "ok"]
        med = ok["latency_median"].to_numpy(float)
        spread = med.max() / med.min() - 1 if len(med) else np.nan
        rows.append({"hardware": hw, "model": model, "batch_size": bs, "variant": variant, "reps": len(g),
                     "ok_reps": len(ok), "n_per_rep": ", ".join(str(n) for n in ok["n"]),
                     "medians_s": json.dumps([round(m, 4) for m in med]), "spread_pct": 100 * spread,
                     "reproducible": bool(spread < REPRO_TOLERANCE) if len(med) > 1 else None})
    return pd.DataFrame(rows)


def overhead_table(plain_records, runs: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Instrumented runs (stage timers on) against plain runs of the same configuration."""
    plain = runs_table(plain_records, baseline)
    pooled = pooled_noise(runs)
    rows = []
    for _, p in (plain[plain["status"] == "ok"].iterrows() if len(plain) else []):
        m = runs[(runs["hardware"] == p["hardware"]) & (runs["model"] == p["model"]) & (runs["variant"] == p["variant"])
                 & (runs["batch_size"] == p["batch_size"]) & (runs["status"] == "ok")]
        if m.empty:
            continue
        inst = m.iloc[0]
        row = {"hardware": p["hardware"], "model": p["model"], "variant": p["variant"], "batch_size": p["batch_size"],
               "plain_median_s": p["latency_median"], "instrumented_median_s": inst["latency_median"],
               "timer_cost_pct": 100 * inst["stage_timer_overhead_s"] / inst["latency_median"]}
        why = difference(p, inst, keys=[k for k in LIKE_FOR_LIKE if k != "instrumented"])
        row.update({"note": f"not compared: {why}"} if why else {**_change_cells(p, inst, pooled[p["hardware"]]),
                                                                 "note": ""})
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the 2023 stack vs today

def stacks_table(runs: pd.DataFrame, baseline: str, published_to_ours: dict | None = None,
                 reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """The study's rows on its own stack (legacy+...) beside today's counterparts, per hardware, model and
    batch size: same machine, weights and protocol, different library versions (named in `differs`), so
    this is its own table, never part of the like-for-like relative one. `change_pct`: today's latency
    relative to the 2023 stack's; `speedup_2023` / `speedup_today`: each variant against its own stack's
    baseline; `published_pct`: the study's published change for the same optimization and batch size."""
    cols = GROUP + ["comparison", "variant_2023", "variant_today", "latency_2023_s", "latency_today_s",
                    "latency_change_pct", "ci_low_pct", "ci_high_pct", "ci_level", "ci_df", "within_noise",
                    "n_baseline", "n_variant", "speedup_2023",
                    "speedup_today", "published_pct", "differs", "note"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    legacy_base = stack_baseline(baseline)
    published = {}
    if reference is not None and published_to_ours:
        for (src, bs), g in reference.groupby(["source", "batch_size"], sort=False):
            base = g[g["variant"] == "no optimization"]
            for p in g.itertuples():
                if len(base) and p.variant in published_to_ours and src == "blog-2023":
                    published[(int(bs), frozenset(published_to_ours[p.variant]))] = \
                        100 * (p.latency_s / base["latency_s"].iloc[0] - 1)
    rows = []
    pooled = pooled_noise(runs)
    for key, grp in runs.groupby(GROUP, sort=False):
        grp = grp[grp["variant"] != CONTROL]
        ok = grp[(grp["status"] == "ok") & grp["instrumented"]].set_index("variant", drop=False)
        opts = {v: frozenset(v.split("+")) for v in grp["variant"]}
        legacy_vs = variant_order([v for v in grp["variant"] if "legacy" in opts[v]], legacy_base)
        today_vs = [v for v in grp["variant"] if "legacy" not in opts[v]]
        pairs = []
        for v in legacy_vs:
            match = [t for t in today_vs if opts[t] == today_counterpart(opts[v])]
            what = ("eager on both stacks: what the library versions changed" if v == legacy_base
                    else f"{v.removeprefix(LEGACY_PREFIX)} (2023) vs {match[0]} (today)" if match else "")
            pairs.append((what, v, match[0] if match else None))
        fastest = {name: vs[int(np.argmin(ok.loc[vs, "latency_gmean"]))] if vs else None
                   for name, vs in (("2023", [v for v in legacy_vs if v in ok.index]),
                                    ("today", [v for v in today_vs if v in ok.index]))}
        if fastest["2023"] and fastest["today"]:
            pairs.append(("fastest of each stack", fastest["2023"], fastest["today"]))
        for what, old, new in pairs:
            row = dict(zip(GROUP, key), comparison=what, variant_2023=old, variant_today=new, note="")
            a = ok.loc[old] if old in ok.index else None
            b = ok.loc[new] if new is not None and new in ok.index else None
            for stack, r, base in (("2023", a, legacy_base), ("today", b, baseline)):
                if r is not None and base in ok.index:
                    row[f"speedup_{stack}"] = ok.loc[base, "latency_gmean"] / r["latency_gmean"]
            if a is None or b is None:
                missing = [v for v, r in ((old, a), (new, b)) if v and r is None]
                row["note"] = ("no today's counterpart configured" if new is None
                               else "not measured here: " + ", ".join(
                                   f"{v} ({grp.set_index('variant').loc[v, 'status']})" for v in missing))
            else:
                row.update(latency_2023_s=a["latency_gmean"], latency_today_s=b["latency_gmean"])
                cells = _change_cells(a, b, pooled[key[0]])
                row.update({k: cells[k] for k in ("latency_change_pct", "ci_low_pct", "ci_high_pct", "ci_level", "ci_df",
                                                  "within_noise", "n_baseline", "n_variant")})
                row["differs"] = (difference(a, b, keys=[k for k in LIKE_FOR_LIKE if k != "versions"])
                                  or f"versions only: {a['versions']} vs {b['versions']}")
            row["published_pct"] = published.get((int(key[-1]), today_counterpart(opts[old])), np.nan)
            rows.append(row)
    return pd.DataFrame(rows).reindex(columns=cols)


# ---------------------------------------------------------------- fidelity verdicts beside the speed rows

def fidelity_within(row) -> bool | None:
    """The verdict a fidelity record gives (True: within tolerance; False: outside; None: none). The one place
    that reads it, so a richer verdict can replace `within_tolerance` here alone."""
    if row.get("status") != "ok":
        return None
    w = row.get("within_tolerance")
    return None if w is None or (isinstance(w, float) and math.isnan(w)) else bool(w)


def _same_stack(cell_versions: str, fid_versions: str) -> bool:
    have = dict(p.split("=", 1) for p in str(cell_versions or "").split() if "=" in p)
    want = dict(p.split("=", 1) for p in str(fid_versions or "").split() if "=" in p)
    return all(have.get(k) == v for k, v in want.items())


def with_fidelity(rel: pd.DataFrame, cells: pd.DataFrame, fidelity: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """The relative table with each row's fidelity verdict ("within", "outside", "failed", "not checked"),
    joined like for like: same hardware, model, weights, checkpoint, baseline and library versions."""
    rel = rel.copy()
    verdicts = []
    per_record = fidelity.drop_duplicates(["hardware", "model", "variant"]) if len(fidelity) else fidelity
    for _, r in rel.iterrows():
        if r["variant"] in (baseline, CONTROL) or r["variant"] == baseline_for(r["variant"], baseline):
            verdicts.append("baseline")
            continue
        c = cells[(cells["hardware"] == r["hardware"]) & (cells["model"] == r["model"])
                  & (cells["batch_size"] == r["batch_size"]) & (cells["variant"] == r["variant"])]
        f = per_record[(per_record["hardware"] == r["hardware"]) & (per_record["model"] == r["model"])
                       & (per_record["variant"] == r["variant"])] if len(per_record) else per_record
        if c.empty or f.empty:
            verdicts.append("not checked")
            continue
        c, f = c.iloc[0], f.iloc[0]
        like = (f["weights"] == c["weights"] and f["model_id"] == c["model_id"]
                and f["baseline"] == baseline_for(r["variant"], baseline)
                and _same_stack(c["versions"], f.get("fidelity_versions")))
        w = fidelity_within(f.to_dict()) if like else None
        verdicts.append("not checked" if not like else "failed" if f["status"] != "ok" else
                        {True: "within", False: "outside", None: "not checked"}[w])
    rel["fidelity"] = verdicts
    return rel


# ---------------------------------------------------------------- audio

def audio_manifest(runs: pd.DataFrame) -> pd.DataFrame:
    """Name in the report -> WAV file, for every ok run that recorded one."""
    ok = runs[(runs["status"] == "ok") & runs["wav"].notna()]
    names = [f"{layout.slug(r.hardware)}__{layout.slug(r.model)}__{r.variant}__bs{r.batch_size}.wav".replace("+", "-")
             for r in ok.itertuples()]
    return pd.DataFrame({"name": names, "source": ok["wav"].tolist(), "variant": ok["variant"].tolist(),
                         "batch_size": ok["batch_size"].tolist(), "hardware": ok["hardware"].tolist(),
                         "model": ok["model"].tolist()})
