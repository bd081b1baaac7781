"""The aggregation step: the declared result files -> tables (CSV) and the report's Markdown fragments.

It reads exactly the files it is given (the workflow passes the ones its config declares) and nothing else.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from . import fragments as md
from . import layout, study2023, tables
from .results import write_atomic


def _write(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


def read_csv(path) -> pd.DataFrame:
    """A table written by `aggregate` (an empty table has no columns)."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def aggregate(results_dir, out_dir, baseline: str, runs, fidelity=(), repro=(), overhead=(),
              config=None, reference=None, faults=()) -> dict[str, Path]:
    """Write `<out_dir>/<table>.csv` for every name in `layout.TABLE_NAMES`, `audio.csv`, and the report's
    fragments `<out_dir>/fragments/<name>.md` for every name in `layout.FRAGMENT_NAMES`."""
    if not runs:
        raise ValueError("no run results given")
    run_recs = tables.read_runs(runs, results_dir, baseline)
    fid_recs = tables.read_fidelity(fidelity, results_dir)
    rep_recs = tables.read_runs(repro, results_dir)
    ovh_recs = tables.read_runs(overhead, results_dir)
    tables.check_one_machine_per_folder(run_recs, fid_recs, rep_recs, ovh_recs)
    if config:
        tables.check_against_config(yaml.safe_load(Path(config).read_text(encoding="utf-8")),
                                    run_recs, rep_recs, ovh_recs)

    processes = tables.runs_table(run_recs, baseline)
    runs_df = tables.cells_table(processes, baseline)  # one row per cell: every statistic is on processes
    data = {
        "runs": runs_df,
        "processes": processes,
        "noise": tables.noise_table(runs_df),
        "absolute": tables.absolute_table(runs_df),
        "relative": tables.relative_table(runs_df, baseline),
        "cross_hardware": tables.cross_hardware_table(runs_df),
        "fidelity": tables.fidelity_table(fid_recs),
        "repro": tables.repro_table(rep_recs, baseline),
        "overhead": tables.overhead_table(ovh_recs, runs_df, baseline),
        "faults": tables.faults_table(faults, results_dir),
    }
    data["relative"] = tables.with_fidelity(data["relative"], runs_df, data["fidelity"], baseline)
    reference_df = pd.read_csv(reference) if reference else None
    data["stacks"] = tables.stacks_table(runs_df, baseline, study2023.PUBLISHED_TO_OURS, reference_df)
    out = Path(out_dir)
    written = {}
    for name in layout.TABLE_NAMES:
        written[name] = out / f"{name}.csv"
        _write(written[name], data[name].to_csv(index=False))
    manifest = tables.audio_manifest(runs_df)
    _write(out / "audio.csv", manifest.to_csv(index=False))

    records = [(f, r) for f, _, r in run_recs]
    machines = {f: {**r.hardware, "device": r.device.get("type")} for f, r in records}
    config_text = Path(config).read_text(encoding="utf-8") if config else None
    text = {
        "warning": md.noise_warning_md(data["relative"])
                   + md.warning_md([r for _, r in records], [r for _, _, r in fid_recs]),
        "findings": md.findings_md(runs_df, data["relative"], data["fidelity"], machines),
        "unavailable": md.unavailable_md(runs_df),
        "protocol": md.protocol_md(runs_df, records, baseline, config_text),
        "provenance": md.provenance_md(records),
        "tables": md.tables_md(data["absolute"], data["relative"], data["noise"]),
        "cross_hardware": md.cross_hardware_md(data["cross_hardware"]),
        "stages": md.stages_md(runs_df, tables.calibration_table(runs_df),
                               tables.cpu_guidance_table(runs_df, data["relative"])),
        "fidelity": md.fidelity_md(data["fidelity"]),
        "faults": md.faults_md(data["faults"]),
        "repro": md.repro_md(data["repro"]),
        "overhead": md.overhead_md(data["overhead"]),
        "comparison": md.comparison_md(reference_df, runs_df, data["relative"]),
        "stacks": md.stacks_md(data["stacks"], data["fidelity"]),
        "audio": md.audio_md(manifest),
    }
    for name in layout.FRAGMENT_NAMES:
        written[f"fragment:{name}"] = out / "fragments" / f"{name}.md"
        _write(written[f"fragment:{name}"], text[name] + "\n")
    return written
