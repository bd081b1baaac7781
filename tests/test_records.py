"""The typed run record: its nested measures read as attributes, and the file on disk unchanged by a round trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_run_json

from barkbench.records import Latency, Memory, ResultError, RunResult, Stage, Timing

WRITTEN = Path(__file__).parent / "data" / "run-sdpa-bs2.json"  # written by `barkbench run` (smoke, bs 2)


def test_a_written_run_reads_as_attributes():
    data = json.loads(WRITTEN.read_text())
    rec = RunResult.from_json(WRITTEN)
    assert isinstance(rec.summary.latency_s, Latency) and isinstance(rec.timing, Timing)
    assert rec.summary.latency_s.median == data["summary"]["latency_s"]["median"]
    assert rec.summary.latency_s.n == len(rec.iterations.latency_s) == len(data["iterations"]["latency_s"])
    assert rec.timing.stopped_by == data["timing"]["stopped_by"]
    assert rec.timing.compile_cache is None and rec.timing.load_s == data["timing"]["load_s"]
    assert isinstance(rec.iterations.stages["semantic"], Stage)
    assert rec.iterations.stages["fine"].tokens == data["iterations"]["stages"]["fine"]["tokens"]
    assert rec.memory.peak_anon_rss_bytes == data["memory"]["peak_anon_rss_bytes"]
    assert rec.throughput.rtf == data["throughput"]["rtf"]
    assert rec.extra["energy"] == data["energy"]  # not a typed measure: kept as written


def test_a_written_run_round_trips_byte_for_byte(tmp_path):
    rec = RunResult.from_json(WRITTEN)
    out = tmp_path / "again.json"
    rec.save_json(out)
    assert out.read_text() == WRITTEN.read_text()


def test_optional_and_unknown_keys_survive_a_round_trip(tmp_path):
    path = make_run_json(tmp_path, "eager", 1, [1.0, 1.2, 1.1])  # no peak_anon_rss_bytes, no compile_cache
    data = json.loads(path.read_text())
    data["memory"]["swap_bytes"] = 7  # a key this version does not know
    path.write_text(json.dumps(data, indent=1))
    rec = RunResult.from_json(path)
    assert rec.memory.peak_anon_rss_bytes is None and rec.timing.compile_cache is None
    assert rec.memory.extra == {"swap_bytes": 7}
    again = rec.to_dict()
    assert again == data
    for measure in ("timing", "iterations", "summary", "memory", "throughput"):  # left out stays out, order kept
        assert json.dumps(again[measure]) == json.dumps(data[measure]), measure


def test_an_optional_key_given_as_none_is_written_as_null():
    given = Memory(peak_rss_bytes=1, peak_anon_rss_bytes=None, rss_after_load_bytes=1, cuda_peak_allocated_bytes=None,
                   cuda_peak_reserved_bytes=None, weights_bytes=None)
    left_out = Memory(peak_rss_bytes=1, rss_after_load_bytes=1, cuda_peak_allocated_bytes=None,
                      cuda_peak_reserved_bytes=None, weights_bytes=None)
    assert given.to_dict()["peak_anon_rss_bytes"] is None and "peak_anon_rss_bytes" not in left_out.to_dict()


def test_an_invalid_nested_measure_is_refused_with_its_place(tmp_path):
    data = json.loads(WRITTEN.read_text())
    del data["summary"]["latency_s"]["median"]
    with pytest.raises(ResultError, match="summary.latency_s"):
        RunResult.from_dict(data, "run.json")


def test_latency_from_values_describes_the_values():
    lat = Latency.from_values([3.0, 1.0, 2.0])
    assert (lat.n, lat.min, lat.median, lat.max) == (3, 1.0, 2.0, 3.0)


def test_update_sets_fields_and_refuses_an_unknown_name():
    rec = RunResult.from_json(WRITTEN)
    rec.update(status="failed", reason="RuntimeError: boom", timing=None)
    assert (rec.status, rec.reason, rec.timing) == ("failed", "RuntimeError: boom", None)
    with pytest.raises(TypeError, match="no field statu"):
        rec.update(statu="ok")
    assert rec.status == "failed"  # nothing set when a name is wrong
