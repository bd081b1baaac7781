"""Aggregation: typed records in, tables and report fragments out; like-for-like comparisons only."""
import json
import math
import re

from pathlib import Path

import pandas as pd
import pytest

from barkbench import layout
from barkbench.aggregate import aggregate, read_csv
from barkbench.figures import FIGURES, make_figures
from barkbench.markdown import fmt_pct, to_pipe_table
from barkbench.records import FidelityResult, ResultError, RunResult
from barkbench.tables import cells_table, read_runs, relative_table, runs_table
from conftest import make_run_json

SIX = [10.0, 10.4, 9.7, 10.2, 9.9, 10.1]


def _runs(paths, root, baseline="eager"):
    return cells_table(runs_table(read_runs(paths, root), baseline), baseline)


def _rel(paths, root, baseline="eager"):
    return relative_table(_runs(paths, root, baseline), baseline).set_index(["variant", "batch_size"])


def _cell(tmp_path, variant, bs, per_process, **kw):
    """Files of one cell: process k gets the calls per_process[k - 1]."""
    return [make_run_json(tmp_path, variant, bs, calls, process=k, **kw) for k, calls in enumerate(per_process, 1)]


def test_processes_and_cells(results_tree):
    results, paths = results_tree
    procs = runs_table(read_runs(paths, results), "eager")
    assert len(procs) == len(paths)  # one row per process
    assert sorted(procs[(procs["variant"] == "eager") & (procs["batch_size"] == 1)]["process"]) == [1, 2]
    assert procs["wav"].dropna().str.endswith("rep1.wav").sum() == 6  # each process keeps its own WAV
    cells = cells_table(procs, "eager")
    assert len(cells) == 8  # eager, control, sdpa at 2 batch sizes; fp16 and offload at bs 1
    eager = cells[(cells["variant"] == "eager") & (cells["batch_size"] == 1)].iloc[0]
    assert eager["n"] == 10 and eager["processes"] == 2 and eager["calls_x_processes"] == "5×2"
    assert eager["latency_gmean"] == pytest.approx(10.0 * math.sqrt(1.02))
    assert eager["latency_ci_low"] < eager["latency_gmean"] < eager["latency_ci_high"]
    assert eager["peak_memory_mb"] == pytest.approx(1000.0) and eager["memory_kind"] == "peak RSS"
    assert eager["stage_semantic_s"] == pytest.approx(4.0 * (1 + 1.02) / 2)
    assert list(cells[cells["batch_size"] == 1]["variant"])[:2] == ["eager", "control"]  # baseline, then control
    assert cells.set_index("variant").loc["offload", "status"] == "failed"


def test_change_is_on_processes_and_its_interval_includes_their_spread(tmp_path):
    root = tmp_path / "results"
    # bs 1: process means differ by 4 % within every cell; sdpa is exactly half of eager in each round
    paths = (_cell(tmp_path, "eager", 1, [[10.0] * 3, [10.4] * 3]) + _cell(tmp_path, "sdpa", 1, [[5.0] * 3, [5.2] * 3])
             + _cell(tmp_path, "eager", 2, [[20.0] * 3]) + _cell(tmp_path, "sdpa", 2, [[10.0] * 3]))
    rel = _rel(paths, root)
    half = rel.loc[("sdpa", 1)]
    assert half["latency_change_pct"] == pytest.approx(-50.0)
    # rounds are blocks: round 2 is 4 % slower for both cells, so nothing is left for the interval's width
    assert half["ci_low_pct"] == pytest.approx(-50.0) and half["ci_high_pct"] == pytest.approx(-50.0)
    assert half["within_noise"] == False and half["n_baseline"] == "3×2" and half["ci_df"] == 1  # noqa: E712
    assert rel.loc[("eager", 1)]["note"] == "baseline"
    # the same spread, not shared by the round: the interval widens to take it in, and 0 % is within noise
    paths2 = (_cell(tmp_path / "b", "eager", 1, [[10.0] * 3, [10.4] * 3])
              + _cell(tmp_path / "b", "sdpa", 1, [[10.4] * 3, [10.0] * 3]))
    same = _rel(paths2, tmp_path / "b" / "results").loc[("sdpa", 1)]
    assert same["latency_change_pct"] == pytest.approx(0.0, abs=1e-9)
    assert same["ci_low_pct"] < -3 and same["ci_high_pct"] > 3 and same["within_noise"] == True  # noqa: E712


def test_one_process_per_cell_gives_no_interval(tmp_path):
    root = tmp_path / "results"
    paths = _cell(tmp_path, "eager", 1, [[10.0, 10.5, 9.8]]) + _cell(tmp_path, "sdpa", 1, [[5.0, 5.2, 4.9]])
    row = _rel(paths, root).loc[("sdpa", 1)]
    assert math.isnan(row["ci_low_pct"]) and pd.isna(row["within_noise"]) and row["latency_change_pct"] < -45


def test_baseline_comes_from_the_config(tmp_path):
    root = tmp_path / "results"
    paths = [make_run_json(tmp_path, "eager", 1, SIX), make_run_json(tmp_path, "sdpa", 1, [x / 2 for x in SIX])]
    rel = _rel(paths, root, baseline="sdpa")
    assert rel.loc[("sdpa", 1)]["note"] == "baseline"
    assert rel.loc[("eager", 1)]["latency_change_pct"] == pytest.approx(100.0)
    assert _runs(paths, root, "sdpa")["variant"].iloc[0] == "sdpa"


@pytest.mark.parametrize("change,expected", [
    ({"weights": "hub"}, "weights differs"),
    ({"max_new_tokens": 256}, "protocol differs (max_new_tokens 64 vs 256)"),
    ({"versions": {"python": "3.11.0", "torch": "2.1.0", "transformers": "4.40.0", "accelerate": "0.30.0"}},
     "versions differs"),
])
def test_unlike_runs_are_not_compared(tmp_path, change, expected):
    root = tmp_path / "results"
    paths = [make_run_json(tmp_path, "eager", 1, SIX), make_run_json(tmp_path, "sdpa", 1, SIX, **change)]
    row = _rel(paths, root).loc[("sdpa", 1)]
    assert math.isnan(row["latency_change_pct"]) and pd.isna(row["within_noise"])
    assert expected in row["note"]


def test_a_folder_of_two_machines_is_refused(tmp_path):
    paths = [make_run_json(tmp_path, "eager", 1, SIX), make_run_json(tmp_path, "sdpa", 1, SIX, machine="cpu-other-2t")]
    with pytest.raises(ResultError, match="2 machines"):
        aggregate(tmp_path / "results", tmp_path / "tables", "eager", paths)


@pytest.mark.parametrize("place", ["sdpa/bs1/rep1.json", "eager/bs2/rep1.json", "eager/bs1.json",
                                   "overhead/sdpa/bs1.json", "repro/sdpa/rep1.json"])
def test_a_file_out_of_place_is_refused(tmp_path, place):
    path = make_run_json(tmp_path, "eager", 1, SIX)
    moved = path.parents[2] / place
    moved.parent.mkdir(parents=True, exist_ok=True)
    moved.write_text(path.read_text())
    with pytest.raises(ResultError, match="not what its place"):
        read_runs([moved], tmp_path / "results")


def test_a_control_file_must_hold_the_baseline(tmp_path):
    path = make_run_json(tmp_path, "sdpa", 1, SIX, control=True)
    with pytest.raises(ResultError, match="A/A control file holds sdpa"):
        read_runs([path], tmp_path / "results", baseline="eager")


@pytest.mark.parametrize("text,message", [
    ("", "empty file"),
    ('{"schema_version": 2, "status": "ok"', "not valid JSON"),
    ("{}", "schema_version None"),
    ('{"schema_version": 1}', "schema_version 1"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_files_get_one_line_naming_them(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ResultError) as err:
        RunResult.from_json(path)
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_a_record_of_another_kind_is_refused(tmp_path):
    path = make_run_json(tmp_path, "eager", 1, SIX)
    with pytest.raises(ResultError, match="not a valid barkbench fidelity result|this barkbench reads"):
        FidelityResult.from_json(path)
    data = json.loads(path.read_text())
    data["status"] = "done"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultError, match="status"):
        RunResult.from_json(path)


def test_records_round_trip(tmp_path):
    path = make_run_json(tmp_path, "eager", 1, SIX)
    rec = RunResult.from_json(path)
    rec.save_json(tmp_path / "copy.json")
    assert json.loads((tmp_path / "copy.json").read_text()) == json.loads(path.read_text())


def test_aggregate_writes_every_table_and_fragment(results_tree, tmp_path):
    results, paths = results_tree
    out = aggregate(results, tmp_path / "tables", "eager", paths)
    assert {p.name for k, p in out.items() if not k.startswith("fragment:")} == {
        f"{n}.csv" for n in layout.TABLE_NAMES}
    assert {p.stem for k, p in out.items() if k.startswith("fragment:")} == set(layout.FRAGMENT_NAMES)
    absolute = read_csv(out["absolute"])
    na = absolute[absolute["variant"] == "fp16"].iloc[0]
    assert na["status"] == "not_applicable" and math.isnan(na["latency_median"])
    assert "boom" in absolute[absolute["variant"] == "offload"].iloc[0]["reason"]
    tables_md = (tmp_path / "tables" / "fragments" / "tables.md").read_text()
    assert "RuntimeError: boom" in tables_md
    assert "| fp16 |" not in tables_md  # not applicable here: listed once, apart
    # every interval printed states its level and degrees of freedom: 6 ok cells x 1 latency + 4 changes (the
    # control and sdpa at 2 batch sizes). At bs 1 every call of a process is alike, so the moments leave no
    # variance and the run's pooled one stands in, on its 5 df (6 cells of 2 processes, minus one round effect);
    # at bs 2 the calls vary and Satterthwaite's df differ from cell to cell.
    tables_part = tables_md.split("**Noise check")[0]
    intervals = re.findall(r"\[[^\]\[|]+?, [^\]\[|]+?\]( \([^)]*\))?", tables_part)
    assert len(intervals) == 10 and all(re.fullmatch(r" \(95 %, t \d+\.\d df\)", lv) for lv in intervals)
    assert sum(lv == " (95 %, t 5.0 df)" for lv in intervals) == 5  # bs 1: eager, control, sdpa; 2 changes
    assert "| 5×2 vs 5×2 |" in tables_md  # calls × processes on both sides of a change
    assert read_csv(out["cross_hardware"]).empty  # one machine
    unavailable = (tmp_path / "tables" / "fragments" / "unavailable.md").read_text()
    box, _, after = unavailable.partition(":::\n\n")
    assert "RuntimeError: boom" in box and "fp16" not in box  # failures in the box ...
    assert "Not applicable on cpu-test-xeon" in after and "fp16" in after  # ... not applicable apart, one line
    warning = (tmp_path / "tables" / "fragments" / "warning.md").read_text()
    assert "noise model failed" not in warning  # the A/A control is within noise here


def test_two_machines_one_report_no_cross_hardware_ratio(tmp_path):
    root = tmp_path / "results"
    paths = [make_run_json(tmp_path, v, 1, [x * f for x in SIX], hardware=hw)
             for hw, f in (("cpu-a-2t", 1.0), ("cuda-b", 0.1)) for v in ("eager", "sdpa")]
    out = aggregate(root, tmp_path / "tables", "eager", paths)
    rel = read_csv(out["relative"])
    assert set(rel["hardware"]) == {"cpu-a-2t", "cuda-b"}
    for hw, g in rel.groupby("hardware"):  # each machine against its own baseline only
        assert g.set_index("variant").loc["sdpa", "latency_change_pct"] == pytest.approx(0.0, abs=1e-9)
    cross = read_csv(out["cross_hardware"])
    assert {"latency_median@cpu-a-2t", "latency_median@cuda-b"} <= set(cross.columns)
    assert not any("change" in c for c in cross.columns)
    text = (tmp_path / "tables" / "fragments" / "tables.md").read_text()
    assert "### cpu-a-2t" in text and "### cuda-b" in text


def test_mixed_versions_are_flagged_at_the_top(tmp_path):
    root = tmp_path / "results"
    paths = [make_run_json(tmp_path, "eager", 1, SIX), make_run_json(tmp_path, "sdpa", 1, SIX, git_commit="def5678")]
    aggregate(root, tmp_path / "tables", "eager", paths)
    warning = (tmp_path / "tables" / "fragments" / "warning.md").read_text()
    assert "mixes software versions" in warning and "def5678" in warning


def test_pipe_table_and_percent_format():
    table = to_pipe_table(pd.DataFrame({"a": ["x|y", None], "b": ["1", "2"]}))
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |", "|  | 2 |"]
    assert fmt_pct(-27.04) == "\u221227.0 %" and fmt_pct(3) == "+3.0 %" and fmt_pct(float("nan")) == ""


def test_figures_from_the_tables(results_tree, tmp_path):
    results, paths = results_tree
    out = aggregate(results, tmp_path / "tables", "eager", paths)
    figs = make_figures(out["runs"], tmp_path / "figs", out["fidelity"])
    assert [p.name for p in figs] == [f"{n}.png" for n in FIGURES]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in figs)
    md = (tmp_path / "figs" / "figures.md").read_text()
    assert all(f"(figures/{n}.png){{#fig-{n}}}" in md and FIGURES[n].caption in md for n in FIGURES)
    runs = read_csv(out["runs"])
    empty = make_figures(runs[runs["status"] != "ok"], tmp_path / "empty")  # no ok runs: "no data" figures
    assert all(p.is_file() for p in empty)


def test_pareto_front():
    from barkbench.figures import pareto_front

    assert list(pareto_front([1, 2, 3, 2.5], [3, 2, 1, 2.5])) == [True, True, True, False]


def _two_round_run(tmp_path, factors):
    """Cells at bs 1, two processes each: {name: (calls per process, factor of process 1, of process 2)};
    name "control" is the A/A control."""
    paths = []
    for name, (base, f1, f2) in factors.items():
        for k, f in ((1, f1), (2, f2)):
            paths.append(make_run_json(tmp_path, "eager" if name == "control" else name, 1, [base * f] * 3,
                                       process=k, control=name == "control"))
    return paths


def test_a_control_outside_noise_warns_at_the_top(tmp_path):
    cells = {"eager": (10.0, 1.0, 1.01), "control": (11.0, 1.0, 1.01), "sdpa": (5.0, 1.0, 1.012),
             "sdpa+int8": (4.0, 1.0, 1.008)}
    out = aggregate(tmp_path / "results", tmp_path / "tables", "eager", _two_round_run(tmp_path, cells))
    warning = (tmp_path / "tables" / "fragments" / "warning.md").read_text()
    assert "This run's noise model failed" in warning and "control vs eager +10.0 %" in warning
    rel = read_csv(out["relative"]).set_index("variant")
    assert rel.loc["control", "within_noise"] == False  # noqa: E712
    findings = (tmp_path / "tables" / "fragments" / "findings.md").read_text()
    assert "A/A control" in findings and "**outside noise**" in findings


def test_headline_is_the_fastest_variant_within_tolerance(tmp_path):
    from test_report import _fidelity

    cells = {"eager": (10.0, 1.0, 1.01), "control": (10.0, 1.005, 1.01), "sdpa": (8.0, 1.0, 1.01),
             "sdpa+int8": (4.0, 1.0, 1.008), "sdpa+bf16": (3.0, 1.0, 1.01)}
    paths = _two_round_run(tmp_path, cells)
    results = tmp_path / "results"
    fid = [_fidelity(results, "sdpa", within=True), _fidelity(results, "sdpa+int8", within=False)]
    out = aggregate(results, tmp_path / "tables", "eager", paths, fidelity=fid)
    rel = read_csv(out["relative"]).set_index("variant")
    assert rel.loc["sdpa", "fidelity"] == "within" and rel.loc["sdpa+int8", "fidelity"] == "outside"
    assert rel.loc["sdpa+bf16", "fidelity"] == "not checked"
    findings = (tmp_path / "tables" / "fragments" / "findings.md").read_text()
    headline = next(line for line in findings.splitlines() if "fastest within tolerance" in line)
    assert "**sdpa**" in headline and "−20.0 %" in headline  # not the faster sdpa+int8 nor sdpa+bf16
    assert "sdpa+bf16 (−70.0 %, fidelity not checked)" in findings
    assert "sdpa+int8 (−60.0 %, fidelity outside)" in findings
    # a fidelity record of other weights is not joined to these speed rows
    data = json.loads(fid[0].read_text())
    data["model"]["weights"] = "hub"
    fid[0].write_text(json.dumps(data))
    out = aggregate(results, tmp_path / "tables2", "eager", paths, fidelity=fid)
    assert read_csv(out["relative"]).set_index("variant").loc["sdpa", "fidelity"] == "not checked"
    assert "no headline" in (tmp_path / "tables2" / "fragments" / "findings.md").read_text()


def test_a_record_of_another_config_is_refused_in_one_line(tmp_path):
    import yaml

    from barkbench.confighash import config_hash

    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    cfg["protocol"]["cpu"].update(warmup=1, min_iterations=2, max_iterations=10, budget_s=20.0, time_limit_s=400.0,
                                  max_new_tokens=64)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    ours = config_hash(cfg, "cpu")
    paths = [make_run_json(tmp_path, "eager", 1, SIX, config_hash=ours),
             make_run_json(tmp_path, "sdpa", 1, SIX, config_hash=ours)]
    aggregate(tmp_path / "results", tmp_path / "tables", "eager", paths, config=tmp_path / "config.yaml")
    foreign = make_run_json(tmp_path, "sdpa", 1, SIX, config_hash="0123456789abcdef", process=2)
    with pytest.raises(ResultError) as err:
        aggregate(tmp_path / "results", tmp_path / "t2", "eager", paths + [foreign], config=tmp_path / "config.yaml")
    assert str(foreign) in str(err.value) and "config hash 0123456789abcdef" in str(err.value)
    assert "\n" not in str(err.value)
    other = make_run_json(tmp_path, "sdpa", 1, SIX, config_hash=ours, process=3, max_new_tokens=32)
    with pytest.raises(ResultError, match="another protocol .max_new_tokens 32 vs 64"):
        aggregate(tmp_path / "results", tmp_path / "t3", "eager", paths + [other], config=tmp_path / "config.yaml")
    hub = make_run_json(tmp_path, "sdpa", 1, SIX, config_hash=ours, process=4, weights="hub")
    with pytest.raises(ResultError, match="hub weights"):
        aggregate(tmp_path / "results", tmp_path / "t4", "eager", paths + [hub], config=tmp_path / "config.yaml")


def test_a_fidelity_file_out_of_place_is_refused(tmp_path):
    from test_report import _fidelity

    path = _fidelity(tmp_path / "results", "sdpa", within=True)
    moved = path.parent / "sdpa+int8.json"
    path.rename(moved)
    with pytest.raises(ResultError, match="not what its place"):
        aggregate(tmp_path / "results", tmp_path / "t", "eager", [make_run_json(tmp_path, "eager", 1, SIX)],
                  fidelity=[moved])


def test_a_too_slow_cell_is_shown_with_its_estimate(tmp_path):
    paths = _cell(tmp_path, "eager", 1, [[10.0] * 3, [10.2] * 3]) + _cell(tmp_path, "sdpa", 1, [[5.0] * 3, [5.1] * 3])
    slow = make_run_json(tmp_path, "sdpa+bf16", 1, [70.0], process=1)
    data = json.loads(slow.read_text())
    data.update(status="too_slow", reason="too slow: 4 timed calls of ~70 s cannot end within the 400 s time limit")
    slow.write_text(json.dumps(data))
    rel = _rel(paths + [slow], tmp_path / "results")
    row = rel.loc[("sdpa+bf16", 1)]
    assert row["slowdown"] == pytest.approx(70.0 / math.sqrt(10.0 * 10.2)) and row["calls_made"] == 1
    aggregate(tmp_path / "results", tmp_path / "tables", "eager", paths + [slow])
    text = (tmp_path / "tables" / "fragments" / "tables.md").read_text()
    assert "≈ 6.9× slower (1 timed call; stopped early" in text
    unavailable = (tmp_path / "tables" / "fragments" / "unavailable.md").read_text()
    assert "sdpa+bf16" in unavailable and "too\\_slow" in unavailable


def test_timed_calls_shortened_by_the_runs_estimate_are_said_in_the_protocol(results_tree, tmp_path):
    results, paths = results_tree
    protocol_md = lambda out: out["fragment:protocol"].read_text()  # noqa: E731
    assert "shortened the timed calls" not in protocol_md(aggregate(results, tmp_path / "t1", "eager", paths))
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data["timing"]:
            data["timing"]["timed_budget_s"] = 12.5  # the protocol's budget_s is 20
            Path(path).write_text(json.dumps(data))
    text = protocol_md(aggregate(results, tmp_path / "t2", "eager", paths))
    assert "the run's estimate shortened the timed calls to 12.5 s per process" in text
