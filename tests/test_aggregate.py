"""Aggregation: typed records in, tables and report fragments out; like-for-like comparisons only."""
import json
import math

import pandas as pd
import pytest

from barkbench import layout
from barkbench.aggregate import aggregate, read_csv
from barkbench.figures import FIGURES, make_figures
from barkbench.fragments import fmt_pct, to_pipe_table
from barkbench.records import FidelityResult, ResultError, RunResult
from barkbench.tables import read_runs, relative_table, runs_table
from conftest import make_run_json

SIX = [10.0, 10.4, 9.7, 10.2, 9.9, 10.1]


def _runs(paths, root, baseline="eager"):
    return runs_table(read_runs(paths, root), baseline)


def _rel(paths, root, baseline="eager"):
    return relative_table(_runs(paths, root, baseline), baseline).set_index(["variant", "batch_size"])


def test_runs_table_one_row_per_record(results_tree):
    results, paths = results_tree
    runs = _runs(paths, results)
    assert len(runs) == len(paths)
    eager = runs[(runs["variant"] == "eager") & (runs["batch_size"] == 1)].iloc[0]
    assert eager["latency_median"] == pytest.approx(10.0) and eager["n"] == 5
    assert math.isnan(eager["latency_ci_low"])  # n = 5: no 95 % interval of the median
    assert eager["peak_memory_mb"] == pytest.approx(1000.0) and eager["memory_kind"] == "peak RSS"
    assert eager["stage_semantic_s"] == pytest.approx(4.0)
    assert eager["wav"].endswith("bs1.wav")
    assert runs[runs["batch_size"] == 1]["variant"].iloc[0] == "eager"  # baseline first


def test_relative_change_uses_valid_intervals(tmp_path):
    root = tmp_path / "results"
    paths = [make_run_json(tmp_path, "eager", 1, SIX), make_run_json(tmp_path, "sdpa", 1, [x / 2 for x in SIX]),
             make_run_json(tmp_path, "eager", 2, [10.0, 10.5, 9.8]), make_run_json(tmp_path, "sdpa", 2, [5.0, 5.2, 4.9])]
    rel = _rel(paths, root)
    six = rel.loc[("sdpa", 1)]
    assert six["latency_change_pct"] == pytest.approx(-50.0)
    assert six["ci_low_pct"] <= -50.0 <= six["ci_high_pct"] and six["within_noise"] == False  # noqa: E712
    assert six["speedup"] == pytest.approx(2.0)
    three = rel.loc[("sdpa", 2)]  # n = 3 per side: no 95 % interval exists, so no verdict on noise
    assert math.isnan(three["ci_low_pct"]) and pd.isna(three["within_noise"])
    assert three["range_low_pct"] < three["latency_change_pct"] < three["range_high_pct"]
    assert rel.loc[("eager", 1)]["note"] == "baseline"


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


def test_a_file_out_of_place_is_refused(tmp_path):
    path = make_run_json(tmp_path, "eager", 1, SIX)
    moved = path.parent.parent / "sdpa" / "bs1.json"
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    with pytest.raises(ResultError, match="not what its place"):
        read_runs([moved], tmp_path / "results")


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
    assert "n too small" in tables_md and "RuntimeError: boom" in tables_md
    assert "| fp16 |" not in tables_md  # not applicable here: listed once, in the callout
    assert "95 % CI]" not in tables_md  # n = 5 everywhere: no interval is printed as a 95 % CI
    assert read_csv(out["cross_hardware"]).empty  # one machine
    unavailable = (tmp_path / "tables" / "fragments" / "unavailable.md").read_text()
    assert unavailable.index("RuntimeError: boom") < unavailable.index("not applicable on cpu: needs CUDA")


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
