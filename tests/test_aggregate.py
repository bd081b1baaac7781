"""Aggregation: tidy runs table, absolute and relative tables, written files."""
import math

import pandas as pd
import pytest

from barkbench.aggregate import aggregate, find_run_jsons, fmt_pct, load_runs, relative_table, to_pipe_table
from barkbench.figures import FIGURES, make_figures, pareto_front
from conftest import make_run_json


def test_load_runs_one_row_per_json(results_tree):
    results, paths = results_tree
    assert sorted(find_run_jsons(results)) == sorted(paths)
    runs = load_runs(paths)
    assert len(runs) == len(paths)
    eager = runs[(runs["variant"] == "eager") & (runs["batch_size"] == 1)].iloc[0]
    assert eager["latency_median"] == pytest.approx(10.0)
    assert eager["peak_memory_mb"] == pytest.approx(1000.0)
    assert eager["memory_kind"] == "peak_rss"
    assert eager["stage_semantic_s"] == pytest.approx(4.0)
    assert eager["samples_per_s"] == pytest.approx(0.1)
    assert eager["wav"].endswith("bs1.wav")
    # baseline listed first within its group
    assert runs[runs["batch_size"] == 1]["variant"].iloc[0] == "eager"


def test_cuda_peak_memory_preferred_on_gpu(tmp_path):
    p = make_run_json(tmp_path, "eager", 1, [1.0, 1.1], device="cuda", peak_rss_mb=3000.0, cuda_peak_mb=1500.0)
    row = load_runs([p]).iloc[0]
    assert row["peak_memory_mb"] == pytest.approx(1500.0)
    assert row["memory_kind"] == "cuda_peak_allocated"


def test_relative_change_on_known_numbers(results_tree):
    _, paths = results_tree
    rel = relative_table(load_runs(paths))
    sdpa = rel[(rel["variant"] == "sdpa") & (rel["batch_size"] == 1)].iloc[0]
    assert sdpa["latency_change_pct"] == pytest.approx(-50.0)
    assert sdpa["latency_change_ci95_low_pct"] == pytest.approx(-50.0)
    assert sdpa["within_noise"] is False or sdpa["within_noise"] == False  # noqa: E712
    assert sdpa["memory_change_pct"] == pytest.approx(-20.0)
    assert sdpa["throughput_change_pct"] == pytest.approx(100.0)
    base = rel[(rel["variant"] == "eager") & (rel["batch_size"] == 1)].iloc[0]
    assert base["latency_change_pct"] == 0.0 and base["note"] == "baseline"
    bs2 = rel[(rel["variant"] == "sdpa") & (rel["batch_size"] == 2)].iloc[0]
    assert bs2["latency_change_ci95_low_pct"] < bs2["latency_change_pct"] < bs2["latency_change_ci95_high_pct"] < 0


def test_within_noise_when_identical_distributions(tmp_path):
    lat = [10.0, 10.5, 9.5, 10.2, 9.8, 10.1]
    paths = [make_run_json(tmp_path, "eager", 1, lat), make_run_json(tmp_path, "sdpa", 1, lat[::-1])]
    row = relative_table(load_runs(paths)).set_index("variant").loc["sdpa"]
    assert row["latency_change_pct"] == pytest.approx(0.0)
    assert row["within_noise"] == True  # noqa: E712


def test_no_baseline_is_flagged(tmp_path):
    rel = relative_table(load_runs([make_run_json(tmp_path, "sdpa", 1, [5.0, 5.0])]))
    assert math.isnan(rel.iloc[0]["latency_change_pct"])
    assert "no ok eager" in rel.iloc[0]["note"]


def test_aggregate_writes_tables_and_keeps_non_ok_rows(results_tree, tmp_path):
    _, paths = results_tree
    out = aggregate(paths, tmp_path / "tables")
    names = {p.name for p in out.values()}
    assert names == {"runs.csv", "absolute.csv", "absolute.md", "relative.csv", "relative.md"}
    assert not list((tmp_path / "tables").glob(".*tmp"))  # no temp files left behind

    absolute = pd.read_csv(out["absolute_csv"])
    na = absolute[absolute["variant"] == "fp16"].iloc[0]
    assert na["status"] == "not_applicable" and na["reason"] == "not applicable on cpu: needs CUDA"
    assert math.isnan(na["latency_median_s"]) and math.isnan(na["peak_memory_mb"])
    failed = absolute[absolute["variant"] == "offload"].iloc[0]
    assert failed["status"] == "failed" and "boom" in failed["reason"]

    relative = pd.read_csv(out["relative_csv"])
    assert set(relative["status"]) == {"ok", "not_applicable", "failed"}

    rel_md = out["relative_md"].read_text()
    assert "| sdpa | \u221250.0 % [\u221250.0 %, \u221250.0 %] | 2.00× | no |" in rel_md
    assert "not applicable on cpu: needs CUDA" in rel_md
    abs_md = out["absolute_md"].read_text()
    assert "| 1 | eager | ok | 5 | 10.00 [10.00, 10.00] | 0.0 % | 1000 |" in abs_md
    assert abs_md.count("\n|---") == 1  # one table for the one hardware/model
    runs = pd.read_csv(out["runs"])
    assert len(runs) == len(paths)


def test_pipe_table_and_percent_format():
    table = to_pipe_table(pd.DataFrame({"a": ["x|y", None], "b": ["1", "2"]}))
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |", "|  | 2 |"]
    assert fmt_pct(-27.04) == "\u221227.0 %" and fmt_pct(3) == "+3.0 %" and fmt_pct(float("nan")) == ""


def test_pareto_front():
    assert list(pareto_front([1, 2, 3, 2.5], [3, 2, 1, 2.5])) == [True, True, True, False]


def test_figures_always_written(results_tree, tmp_path):
    _, paths = results_tree
    runs = load_runs(paths)
    out = make_figures(runs, tmp_path / "figs")
    assert [p.name for p in out] == list(FIGURES)
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in out)
    csv = aggregate(paths, tmp_path / "tables")["runs"]
    assert [p.name for p in make_figures(csv, tmp_path / "from_csv", [])] == list(FIGURES)  # the CLI's call
    empty = make_figures(runs[runs["status"] != "ok"], tmp_path / "empty")  # no ok runs: "no data" figures
    assert [p.name for p in empty] == list(FIGURES) and all(p.is_file() for p in empty)
