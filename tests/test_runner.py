"""One benchmark run end to end on synthetic:tiny: the result document, its numbers, its files."""
from __future__ import annotations

import json
import os
import re
import stat
import time

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from barkbench import jobwrap, models, results, runner, trackers, variants
from barkbench.protocol import DEADLINE_ENV, Protocol
from barkbench.records import ResultError, RunResult
from conftest import TINY, TORCH_THREADS

MAX_NEW = 8


def _protocol(**overrides):
    base = dict(warmup=1, min_iterations=1, max_iterations=3, budget_s=1e6, batch_size=1, max_new_tokens=MAX_NEW,
                length_mode="fixed")
    return Protocol(**{**base, **overrides})


def _request(variant, proto, model=TINY, **kwargs):
    return runner.RunRequest(model, variant, proto, device="cpu", threads=TORCH_THREADS, **kwargs)


@pytest.fixture(scope="module")
def sdpa_run(tiny_checkpoint, tmp_path_factory):
    """sdpa, batch 1, 1 warm-up + 3 timed calls (max_iterations, budget never reached), sampled decoding
    (the study's default), fixed length."""
    folder = tmp_path_factory.mktemp("run") / "results" / "sdpa"
    out = folder / "bs1.json"
    proto = _protocol()
    result = runner.run(_request("sdpa", proto, config_hash="abc123"), out)
    return result, out, proto


def test_result_validates_and_matches_the_file(sdpa_run):
    result, out, _ = sdpa_run
    assert result.status == "ok", result.reason
    RunResult.from_dict(result.to_dict())
    on_disk = RunResult.from_json(out).to_dict()  # validates too
    assert on_disk == json.loads(json.dumps(result.to_dict()))
    assert on_disk["config_hash"] == "abc123"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_read_bandwidth_probed_around_the_timed_calls_outside_their_memory(sdpa_run, monkeypatch):
    """A CPU run reads the bandwidth before its first timed call and after each (its floors' bandwidth), and the
    probe's own buffer never counts in the calls' peak memory."""
    result, _, _ = sdpa_run
    probes = result.iterations.read_bandwidth_bytes_per_s
    assert len(probes) == len(result.iterations.latency_s) + 1 and min(probes) > 0
    gemm = result.iterations.fine_gemm_flops_per_s  # and the GEMM throughput of the fine stage's format (sdpa: fp32)
    assert result.model["stage_work"]["fine"]["gemm_dtype"] == "fp32"
    assert len(gemm) == len(probes) and min(gemm) > 0
    from barkbench import calibration
    from barkbench.trackers import PeakRSS, anon_rss_bytes

    with PeakRSS(interval_s=0.001) as rss:
        before = anon_rss_bytes()
        with rss.paused():
            calibration.read_bandwidth_now("sum", reps=20)
    assert rss.peak_anon < before + calibration.BANDWIDTH_BYTES / 2


def test_result_describes_the_run(sdpa_run):
    result, _, proto = sdpa_run
    assert result.model["requested"] == TINY
    assert result.model["id"] == TINY
    assert result.model["weights"] == "synthetic"
    assert result.model["architecture"] == "tiny"
    assert result.model["parameters"] > 0
    assert result.model["weights_bytes"] >= 4 * result.model["parameters"]
    assert result.variant["name"] == "sdpa" and result.variant["optimizations"] == ["sdpa"]
    assert result.device["type"] == "cpu"
    assert result.protocol == proto.to_dict()
    assert result.instrumented is True
    assert result.timing.load_s > 0
    timing = result.timing
    assert len(timing.warmup_s) == 1 and timing.first_call_s == timing.warmup_s[0]
    assert timing.first_call_overhead_s == pytest.approx(
        timing.warmup_s[0] - float(np.median(result.iterations.latency_s)))
    assert timing.compile_s is None and timing.compile_cache is None
    assert timing.stopped_by == "max_iterations"
    assert timing.timed_s == pytest.approx(sum(result.iterations.latency_s))
    assert timing.job_s >= timing.load_s + timing.warmup_s[0] + timing.timed_s
    assert timing.time_limit_s == proto.time_limit_s and timing.time_limit_source == "protocol"
    assert result.retry_of is None
    assert result.memory.peak_rss_bytes > 0 and result.memory.rss_after_load_bytes > 0
    assert result.memory.cuda_peak_allocated_bytes is None
    assert result.memory.weights_bytes == result.model["weights_bytes"]
    assert result.hardware["torch_threads"] >= 1
    assert result.started_at <= result.finished_at


def test_summary_is_recomputable_from_the_iterations(sdpa_run):
    result, out, proto = sdpa_run
    latencies = result.iterations.latency_s
    assert len(latencies) == proto.max_iterations
    assert all(x > 0 for x in latencies)
    # the summary describes these very calls (checked against the numbers themselves, not the same function)
    summary = result.summary.latency_s
    ordered = sorted(latencies)
    assert summary.n == len(latencies) and summary.min == ordered[0] and summary.max == ordered[-1]
    assert summary.median == pytest.approx((ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2)
    assert summary.mean == pytest.approx(sum(latencies) / len(latencies))
    on_disk = json.loads(out.read_text())
    assert on_disk["summary"] == result.summary.to_dict() and on_disk["iterations"]["latency_s"] == latencies


def test_throughput_is_consistent(sdpa_run):
    result, _, proto = sdpa_run
    median = float(np.median(result.iterations.latency_s))
    audio = float(np.mean(result.iterations.audio_s))
    assert result.summary.latency_s.median == pytest.approx(median, rel=1e-12)
    tp = result.throughput
    assert tp.samples_per_s == pytest.approx(proto.batch_size / median, rel=1e-9)
    assert tp.audio_s_per_s == pytest.approx(proto.batch_size * audio / median, rel=1e-9)
    assert tp.rtf == pytest.approx(median / (proto.batch_size * audio), rel=1e-9)
    assert tp.rtf * tp.audio_s_per_s == pytest.approx(1.0)


def test_wav_beside_the_json(sdpa_run):
    result, out, _ = sdpa_run
    wav = out.with_suffix(".wav")
    assert result.audio == {"sample_rate": 24_000, "wav": wav.name}
    rate, data = wavfile.read(wav)
    assert rate == 24_000
    assert data.ndim == 1 and data.size > 0 and data.dtype == np.float32
    assert np.isfinite(data).all() and np.abs(data).max() > 0
    # the sample is the first call's first waveform, cut at its length
    assert data.size == round(result.iterations.audio_s[0] * 24_000)


def test_fixed_length_mode_decodes_max_new_tokens_every_time(sdpa_run):
    result, _, proto = sdpa_run
    assert result.iterations.semantic_tokens == [MAX_NEW] * proto.max_iterations
    assert result.iterations.stages["semantic"].tokens == [MAX_NEW] * proto.max_iterations
    # the same length every call: the same audio duration too
    assert len(set(result.iterations.audio_s)) == 1 and result.iterations.audio_s[0] > 0


def test_stage_seconds_are_positive_and_within_the_latency(sdpa_run):
    result, _, proto = sdpa_run
    it = result.iterations
    assert set(it.stages) == {"semantic", "coarse", "fine", "decode"}
    for stage, record in it.stages.items():
        assert len(record.seconds) == proto.max_iterations, stage
        assert len(record.tokens) == proto.max_iterations, stage
        assert all(s > 0 for s in record.seconds), stage
        assert all(t > 0 for t in record.tokens), stage
    for i, latency in enumerate(it.latency_s):
        assert sum(record.seconds[i] for record in it.stages.values()) <= latency
    # decode "tokens" are audio samples: one call's audio
    assert it.stages["decode"].tokens[0] == round(it.audio_s[0] * 24_000)


@pytest.mark.parametrize("variant", ["sdpa", "sdpa+devloop"])
def test_decode_steps_are_timed_apart_from_the_prefills(variant, sdpa_run, tmp_path):
    """Semantic: one generate loop; coarse: one per sliding window of 60 tokens. Each loop's decode steps are its
    tokens after the prefill's, less the last (no next step ends it). The device-side loop (its own loop, not
    transformers') marks the same steps on a CPU."""
    if variant == "sdpa":
        result, _, proto = sdpa_run
    else:
        proto = _protocol()
        result = runner.run(_request(variant, proto), tmp_path / "bs1.json")
        assert result.status == "ok", result.reason
    it = result.iterations
    for stage, record in ((s, it.stages[s]) for s in ("semantic", "coarse")):
        loops = -(-record.tokens[0] // 60) if stage == "coarse" else 1
        assert record.decode_steps == [record.tokens[0] - 2 * loops] * proto.max_iterations, stage
        # each counted step attends to more positions than the 257-token prompt of a semantic call or coarse window
        assert all(p > 257 * n for p, n in zip(record.decode_cache_positions, record.decode_steps)), stage
        if variant != "sdpa":  # its own loop counts the positions transformers' loop counts for the same steps
            same = sdpa_run[0].iterations.stages[stage]
            assert same.decode_steps == record.decode_steps, stage
            assert same.decode_cache_positions == record.decode_cache_positions, stage
        assert all(0 < d < s for d, s in zip(record.decode_seconds, record.seconds)), stage


def test_no_temporary_files_left(sdpa_run):
    _, out, _ = sdpa_run
    assert sorted(p.name for p in out.parent.iterdir()) == ["bs1.json", "bs1.wav"]


def test_batch_of_two(tiny_checkpoint, tmp_path):
    out = tmp_path / "bs2.json"
    proto = _protocol(max_iterations=1, batch_size=2, do_sample=False)
    result = runner.run(_request("sdpa", proto), out)
    assert result.status == "ok", result.reason
    RunResult.from_dict(result.to_dict())
    assert result.hardware["torch_threads"] == TORCH_THREADS
    assert result.protocol["batch_size"] == 2
    assert result.protocol["prompts"] == proto.prompts
    assert result.iterations.semantic_tokens == [MAX_NEW]
    median = result.summary.latency_s.median
    assert result.throughput.samples_per_s == pytest.approx(2 / median, rel=1e-9)
    assert result.iterations.stages["decode"].tokens[0] == pytest.approx(
        2 * result.iterations.audio_s[0] * 24_000)
    rate, data = wavfile.read(out.with_suffix(".wav"))
    assert rate == 24_000 and data.size > 0


def test_uninstrumented_run(tiny_checkpoint, tmp_path):
    out = tmp_path / "plain.json"
    proto = _protocol(max_iterations=1, do_sample=False)
    result = runner.run(_request("eager", proto, instrument_stages=False), out)
    assert result.status == "ok", result.reason
    RunResult.from_dict(result.to_dict())
    assert result.instrumented is False
    assert result.iterations.stages is None
    assert result.iterations.semantic_tokens == []
    assert result.summary.latency_s.n == 1
    assert out.with_suffix(".wav").is_file()


def test_protocol_generate_kwargs():
    fixed = Protocol(max_new_tokens=8).generate_kwargs()
    assert fixed["semantic_max_new_tokens"] == fixed["semantic_min_new_tokens"] == 8
    assert fixed["return_output_lengths"] is True
    assert "semantic_min_new_tokens" not in Protocol(max_new_tokens=8, length_mode="natural").generate_kwargs()
    assert Protocol(batch_size=3, prompts=["a", "b"]).batch_prompts() == ["a", "b", "a"]


def test_protocol_defaults_are_the_2023_gpu_study():
    p = Protocol()
    assert (p.warmup, p.min_iterations, p.max_iterations, p.budget_s, p.time_limit_s) == (2, 2, 100, 600.0, 3600.0)
    assert (p.batch_size, p.max_new_tokens, p.length_mode, p.do_sample) == (1, 256, "fixed", True)
    assert (p.fine_temperature, p.coarse_temperature, p.seed) == (0.4, 0.8, 0)


@pytest.mark.parametrize("bad, message", [
    ({"warmup": 0}, "warmup must be >= 1 (got 0)"),
    ({"min_iterations": 0}, "min-iterations must be >= 1"),
    ({"min_iterations": 5, "max_iterations": 2}, "max-iterations must be >= min-iterations (got 2 < 5)"),
    ({"budget_s": -1.0}, "budget-s must be >= 0"),
    ({"time_limit_s": 0.0}, "time-limit-s must be > 0"),
    ({"time_limit_s": float("nan")}, "time-limit-s must be a finite number"),
    ({"batch_size": 0}, "batch-size must be >= 1"),
    ({"max_new_tokens": 0}, "max-new-tokens must be >= 1"),
    ({"max_new_tokens": 100000}, "max-new-tokens must be <= 768 (got 100000)"),
    ({"length_mode": "bogus"}, "length-mode must be one of fixed, natural (got 'bogus')"),
    ({"fine_temperature": 0.0}, "fine-temperature must be > 0 (got 0.0)"),
    ({"coarse_temperature": -1.0}, "coarse-temperature must be > 0"),
    ({"seed": -1}, "seed must be >= 0 (got -1)"),
    ({"seed": 1.5}, "seed must be of type integer"),
    ({"seed": 1.0}, "seed must be of type integer (got 1.0)"),  # an integer is an int, as on the command line
    ({"warmup": True}, "warmup must be of type integer"),
    ({"budget_s": float("inf")}, "budget-s must be a finite number"),
    ({"seed": -1, "warmup": 0}, "warmup must be >= 1"),  # the first field in the protocol's order
    ({"do_sample": "yes"}, "do-sample must be of type boolean"),
    ({"prompts": []}, "prompts needs at least 1 item"),
    ({"prompts": ["a", 3]}, "prompts must be of type string"),
])
def test_protocol_rejects_bad_values_naming_the_option(bad, message):
    with pytest.raises(ValueError, match="^" + __import__("re").escape(message)):
        Protocol(**bad)


def test_protocol_json_schema_is_generated_from_the_dataclass():
    import dataclasses

    import jsonschema

    schema = Protocol.json_schema()
    names = [f.name for f in dataclasses.fields(Protocol)]
    assert list(schema["properties"]) == names and schema["required"] == names
    assert schema["additionalProperties"] is False
    assert schema["properties"]["fine_temperature"]["exclusiveMinimum"] == 0
    assert schema["properties"]["max_new_tokens"]["maximum"] == 768
    assert schema["properties"]["length_mode"]["enum"] == ["fixed", "natural"]
    assert all(prop["description"] for prop in schema["properties"].values())
    jsonschema.validate(Protocol().to_dict(), schema)
    for bad in ({"fine_temperature": 0.0}, {"seed": -1}, {"max_new_tokens": 100000}, {"warmup": 0},
                {"length_mode": "bogus"}, {"iterations": 3}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**Protocol().to_dict(), **bad}, schema)
    # the run schema takes its protocol from here; the workflow config's per-device block leaves some out
    assert results.schema()["properties"]["protocol"] == schema
    device_block = Protocol.json_schema(exclude=("batch_size", "prompts", "do_sample", "fine_temperature",
                                                 "coarse_temperature", "seed"))
    assert set(device_block["properties"]) == set(device_block["required"]) == {
        "warmup", "min_iterations", "max_iterations", "budget_s", "time_limit_s", "max_new_tokens", "length_mode"}


# --- stopping rules and time limits ----------------------------------------------------------------

def test_zero_budget_stops_at_min_iterations(tiny_checkpoint, tmp_path):
    proto = _protocol(min_iterations=2, max_iterations=10, budget_s=0.0, do_sample=False)
    result = runner.run(_request("sdpa", proto, retry_of="sdpa-bs1-try1"), tmp_path / "b.json")
    assert result.status == "ok", result.reason
    assert len(result.iterations.latency_s) == 2 and result.summary.latency_s.n == 2
    assert result.timing.stopped_by == "budget"
    assert result.retry_of == "sdpa-bs1-try1"
    assert RunResult.from_json(tmp_path / "b.json").to_dict()["retry_of"] == "sdpa-bs1-try1"


def test_stop_reason():
    proto = Protocol(min_iterations=2, max_iterations=4, budget_s=10.0, time_limit_s=100.0)
    job = jobwrap.Job(100.0, "protocol")
    assert runner.stop_reason(proto, [], job) is None
    assert runner.stop_reason(proto, [50.0], job) is None  # min_iterations first, whatever the budget
    assert runner.stop_reason(proto, [1.0, 1.0], job) is None
    assert runner.stop_reason(proto, [1.0] * 4, job) == "max_iterations"
    assert runner.stop_reason(proto, [6.0, 4.0], job) == "budget"
    job.start -= 98.5  # 98.5 s into the 100 s job
    long = Protocol(min_iterations=2, max_iterations=9, budget_s=99.0)
    assert runner.stop_reason(long, [2.0, 2.0], job) == "time_limit"  # the next 2 s call would cross it
    assert runner.stop_reason(long, [1.0, 1.0], job) is None  # a 1 s call still fits
    # short of min_iterations, a call that cannot end in time: too slow (test_stop_reason_too_slow)
    assert runner.stop_reason(Protocol(min_iterations=3, max_iterations=9), [2.0, 2.0], job) == "too_slow"


def test_stop_reason_too_slow():
    """Before the minimum calls are timed: stop when the calls so far (before the first one, the warm-up call's
    time) show that the rest cannot end within the time limit."""
    proto = Protocol(min_iterations=3, max_iterations=9, budget_s=1.0, time_limit_s=100.0)
    job = jobwrap.Job(100.0, "protocol")
    job.start -= 50.0  # 50 s into the 100 s job
    assert runner.stop_reason(proto, [20.0], job) is None  # 2 more of 20 s end at 90 s
    assert runner.stop_reason(proto, [30.0], job) == "too_slow"  # 2 more of 30 s would end at 110 s
    assert runner.stop_reason(proto, [], job, warmup_guess=10.0) is None  # 3 of 10 s end at 80 s
    assert runner.stop_reason(proto, [], job, warmup_guess=20.0) == "too_slow"
    assert runner.stop_reason(proto, [], job) is None  # no guess (a compiled variant's only warm-up): try one


@pytest.mark.parametrize("slow_call,timed", [(1, 0), (2, 1)])
def test_a_hopeless_run_stops_early_and_keeps_what_it_measured(tiny_checkpoint, tmp_path, monkeypatch, slow_call,
                                                               timed):
    """A 5 s call (the warm-up, or the first timed call) among ~0.1 s ones, with 3 timed calls required in a
    12 s limit: the run stops as too_slow instead of running into the limit, with the calls it made. (The limit
    leaves ~7 s for loading the model and the fast calls on a loaded machine.)"""
    calls = []
    _slow_decode(monkeypatch, slow_call, calls, sleep_s=5.0)
    proto = _protocol(min_iterations=3, max_iterations=9, time_limit_s=12.0, do_sample=False)
    out = tmp_path / "slow.json"
    result = runner.run(_request("sdpa", proto), out)
    assert result.status == "too_slow", result.reason
    assert re.fullmatch(r"too slow: 3 timed calls of ~(\d\.\d) s cannot end within the 12 s time limit; stopped "
                        + (r"after 1 timed call" if timed else r"after 0 timed calls \(warm-up only\)"), result.reason)
    assert result.timing.stopped_by == "too_slow" and result.timing.warmup_s
    if timed:
        assert len(result.iterations.latency_s) == 1 and result.iterations.latency_s[0] >= 5.0
        assert result.summary.latency_s.n == 1
    else:
        assert result.iterations is None and result.timing.warmup_s[0] >= 5.0
    assert len(calls) == 1 + timed  # no call started after the verdict
    assert RunResult.from_json(out).to_dict()["status"] == "too_slow"


def _slow_decode(monkeypatch, sleep_on_call: int, calls: list, sleep_s: float = 120):
    """Every generate call decodes its audio once: the `sleep_on_call`-th (1-based, warm-up included)
    sleeps until the time limit interrupts it, after the semantic, coarse and fine stages ran."""
    real_load = models.load

    def load(source, **kwargs):
        loaded = real_load(source, **kwargs)
        quantizer = loaded.model.codec_model.quantizer
        real_decode = quantizer.decode

        def decode(*args, **kw):
            calls.append(time.perf_counter())
            if len(calls) == sleep_on_call:
                time.sleep(sleep_s)
            return real_decode(*args, **kw)

        quantizer.decode = decode
        return loaded

    monkeypatch.setattr(models, "load", load)


LIMIT_S = 8.0  # load and a few tiny calls take ~1.5 s (3 s beside another test worker); the limit then fires in the sleeping call


def test_time_limit_during_warm_up_is_recorded_failed(tiny_checkpoint, tmp_path, monkeypatch):
    import signal

    calls = []
    _slow_decode(monkeypatch, 1, calls)
    out = tmp_path / "slow" / "bs1.json"
    handler = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    result = runner.run(_request("sdpa", _protocol(time_limit_s=LIMIT_S, do_sample=False)), out)
    # interrupted, not slept out (120 s): the limit starts after the CPU calibration, 2-6 s on a 2-core machine
    assert time.perf_counter() - start < LIMIT_S + 30
    assert result.status == "failed"
    assert result.reason.startswith(f"time limit {LIMIT_S} s reached during warm-up/compilation (first call still "
                                    "running after "), result.reason
    assert result.error["type"] == "TimeLimitExceeded"
    assert result.timing is None and result.iterations is None and result.audio is None
    assert RunResult.from_json(out).to_dict()["status"] == "failed"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bs1.json"]
    assert signal.getsignal(signal.SIGALRM) is handler  # disarmed, previous handler back
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("min_iterations", [1, 2])
def test_time_limit_during_timed_calls(tiny_checkpoint, tmp_path, monkeypatch, min_iterations):
    """The third call (warm-up, timed 1, timed 2) never ends: with min 1 the first timed call is kept,
    with min 2 the run fails saying where it stood."""
    calls = []
    _slow_decode(monkeypatch, 3, calls)
    # min 2: room for both calls as the fast ones predict them (not a too_slow verdict), so the limit fires
    limit = LIMIT_S if min_iterations == 1 else 2.5 * LIMIT_S
    proto = _protocol(min_iterations=min_iterations, max_iterations=100, time_limit_s=limit, do_sample=False)
    result = runner.run(_request("sdpa", proto), tmp_path / "r.json")
    if min_iterations == 2:
        assert result.status == "failed"
        assert result.reason == f"time limit {2.5 * LIMIT_S:g} s reached after 1 of min 2 timed calls"
        return
    assert result.status == "ok", result.reason
    assert result.timing.stopped_by == "time_limit"
    n = len(result.iterations.latency_s)
    assert n == 1 and len(result.iterations.audio_s) == 1
    # the interrupted call had timed its semantic, coarse and fine stages: dropped
    assert all(len(r.seconds) == len(r.tokens) == 1 for r in result.iterations.stages.values())
    assert result.iterations.semantic_tokens == [MAX_NEW]
    assert len(result.iterations.read_bandwidth_bytes_per_s) == 2  # before the kept call and after it
    assert len(result.iterations.fine_gemm_flops_per_s) == 2
    assert result.timing.job_s >= LIMIT_S
    assert (tmp_path / "r.wav").is_file()


def test_deadline_caps_the_time_limit(monkeypatch):
    proto = Protocol(time_limit_s=3600.0)
    now = 1_000_000.0
    monkeypatch.delenv(DEADLINE_ENV, raising=False)
    job = jobwrap.job_time_limit(proto.time_limit_s, now)
    assert (job.limit_s, job.limit_source) == (3600.0, "protocol")
    monkeypatch.setenv(DEADLINE_ENV, str(now + 600))
    job = jobwrap.job_time_limit(proto.time_limit_s, now)
    assert (job.limit_s, job.limit_source) == (600.0, "run deadline")
    assert job.exceeded("after 1 of min 2 timed calls").args[0] == (
        "time limit 600 s (run deadline) reached after 1 of min 2 timed calls")
    monkeypatch.setenv(DEADLINE_ENV, str(now + 7200))
    assert jobwrap.job_time_limit(proto.time_limit_s, now).limit_source == "protocol"
    monkeypatch.setenv(DEADLINE_ENV, "tomorrow")
    with pytest.raises(ValueError, match="BARKBENCH_DEADLINE"):
        jobwrap.job_time_limit(proto.time_limit_s, now)


def test_compile_variant_runs_with_a_cold_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """torch.compile stubbed out (a real compile takes ~30 s): the run labels compile time as cold and
    compiles against a fresh per-run inductor cache that is removed afterwards."""
    seen = {}

    def fake_compile(fn, **kwargs):
        seen.update({k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")})
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "warm"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    result = runner.run(_request("sdpa+compile", _protocol(max_iterations=2, do_sample=False)), tmp_path / "c.json")
    assert result.status == "ok", result.reason
    timing = result.timing
    assert timing.compile_cache == runner.COLD_CACHE
    assert timing.compile_s == pytest.approx(max(0.0, timing.first_call_overhead_s))
    inductor = seen["TORCHINDUCTOR_CACHE_DIR"]
    assert inductor and inductor != str(tmp_path / "warm") and seen["TRITON_CACHE_DIR"]
    assert not os.path.exists(os.path.dirname(inductor))  # removed after the run
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "warm")  # environment restored
    assert "TRITON_CACHE_DIR" not in os.environ


def test_an_optimization_that_compiles_gets_its_compile_counters(tiny_checkpoint, tmp_path):
    """The runner counts what torch.compile did for an optimization that says it compiles, whatever its name."""
    name = "compilesalike"
    variants.register(variants.Optimization(name, "a test's own optimization that says it compiles", order=95,
                                            compiles=True))
    try:
        result = runner.run(_request(f"sdpa+{name}", _protocol(max_iterations=2, do_sample=False)), tmp_path / "a.json")
    finally:
        del variants.REGISTRY[name]
    assert result.status == "ok", result.reason
    assert result.extra["compiled"]["recompiles_timed"] == 0  # counted; nothing was compiled
    plain = runner.run(_request("sdpa", _protocol(max_iterations=2, do_sample=False)), tmp_path / "b.json")
    assert plain.status == "ok" and "compiled" not in plain.extra


def test_time_limit_outside_the_main_thread_is_not_armed():
    import threading

    box = {}

    def body():
        with trackers.TimeLimit(0.01) as limit:
            time.sleep(0.05)
        box["armed"] = limit.armed

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert box == {"armed": False}


class _EosAfter(torch.nn.Module):
    """Wraps the semantic head: from the (after+1)-th step of each generate call on (its first step
    sees the whole prompt, the next ones one token), the EOS token wins by far."""

    def __init__(self, head, after):
        super().__init__()
        self.head, self.after, self.calls = head, after, 0

    def forward(self, hidden):
        logits = self.head(hidden)
        self.calls = 1 if hidden.shape[1] > 1 else self.calls + 1
        if self.calls > self.after:
            logits[..., models.SEMANTIC_GENERATION["eos_token_id"]] += 100.0
        return logits


def test_fixed_length_mode_overrides_an_early_eos(tiny_checkpoint, tmp_path, monkeypatch):
    real_load = models.load

    def load_with_early_eos(source, **kwargs):
        loaded = real_load(source, **kwargs)
        loaded.model.semantic.lm_head = _EosAfter(loaded.model.semantic.lm_head, after=3)
        return loaded

    monkeypatch.setattr(models, "load", load_with_early_eos)
    tokens = {}
    for mode in ("natural", "fixed"):
        proto = _protocol(max_iterations=1, length_mode=mode, do_sample=False)
        result = runner.run(_request("eager", proto), tmp_path / f"{mode}.json")
        assert result.status == "ok", result.reason
        tokens[mode] = (result.iterations.semantic_tokens[0], result.iterations.audio_s[0])
    assert tokens["natural"][0] < MAX_NEW  # the model stopped early on its own...
    assert tokens["fixed"][0] == MAX_NEW  # ...but fixed mode decodes max_new_tokens regardless
    assert tokens["natural"][1] < tokens["fixed"][1]


def test_forced_failure_is_recorded(tiny_checkpoint, tmp_path):
    out = tmp_path / "failed" / "bs1.json"
    proto = _protocol(max_iterations=1)
    result = runner.run(_request("sdpa", proto, fail_with="boom"), out)
    assert result.status == "failed"
    assert result.reason == "RuntimeError: boom"
    assert result.error["type"] == "RuntimeError" and result.error["message"] == "boom"
    assert "boom" in result.error["traceback"] and "Traceback" in result.error["traceback"]
    for key in ("timing", "iterations", "summary", "memory", "throughput", "audio"):
        assert getattr(result, key) is None, key
    on_disk = RunResult.from_json(out).to_dict()
    assert on_disk["status"] == "failed" and on_disk["error"]["message"] == "boom"
    assert on_disk["model"]["id"] == TINY  # what it tried to run is still recorded
    assert sorted(p.name for p in out.parent.iterdir()) == ["bs1.json"]  # no WAV, no temp file


def test_unresolvable_model_raises_and_writes_nothing(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "x" / "bs1.json"
    with pytest.raises(models.ModelSourceError, match="synthetic:bark-small"):
        runner.run(_request("eager", _protocol(), model="suno/bark-small"), out)
    assert not out.exists()


def test_not_applicable_hub_model_never_loads(tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a not-applicable run must not load the model")

    monkeypatch.setattr(models, "load", no_load)
    monkeypatch.setattr(models, "resolve", no_load)
    out = tmp_path / "fp16.json"
    result = runner.run(_request("sdpa+fp16", _protocol(), model="suno/bark"), out)
    assert result.status == "not_applicable"
    assert result.reason.startswith("not applicable on cpu: fp16")
    assert result.model == {"requested": "suno/bark", "id": "suno/bark", "weights": None, "architecture": "bark"}
    assert RunResult.from_json(out).to_dict()["status"] == "not_applicable"


def test_threads_request_sets_torch_threads(tmp_path):
    import psutil

    try:
        # a run that does not load anything still sets the threads first and records them
        default = runner.run(runner.RunRequest(TINY, "fp16", _protocol(), device="cpu"), tmp_path / "a.json")
        assert default.hardware["torch_threads"] == (psutil.cpu_count(logical=False) or os.cpu_count())
        three = runner.run(runner.RunRequest(TINY, "fp16", _protocol(), device="cpu", threads=3), tmp_path / "b.json")
        assert three.hardware["torch_threads"] == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(TORCH_THREADS)


# --- atomic writes ---------------------------------------------------------------------------------

def test_write_atomic_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    results.write_atomic(path, b"old")
    with pytest.raises(TypeError):
        results.write_atomic(path, "not bytes")  # fails half-way, after the temporary file exists
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_run_record_refuses_an_invalid_document(tmp_path, sdpa_run):
    result = sdpa_run[0].to_dict()
    path = tmp_path / "r.json"
    bad = RunResult.from_dict(result)
    bad.status = "great"
    with pytest.raises(ResultError, match="great"):
        bad.save_json(path)
    assert not path.exists() and not list(tmp_path.iterdir())
    missing = {k: v for k, v in result.items() if k != "summary"}
    with pytest.raises(ResultError, match="summary"):
        RunResult.from_dict(missing)
    ok_without_iterations = {**result, "iterations": None}
    with pytest.raises(ResultError):
        RunResult.from_dict(ok_without_iterations)  # status ok demands the measurements
    RunResult.from_dict(result).save_json(path)
    assert RunResult.from_json(path).to_dict() == json.loads(json.dumps(result))
    assert not [p for p in os.listdir(tmp_path) if p != "r.json"]


# --- stage tracker ---------------------------------------------------------------------------------

class _Stage:
    def __init__(self, out, loops=()):
        self.out, self.loops = out, loops

    def generate(self, *args, **kwargs):
        for steps in self.loops:  # transformers' loop: a prefill, then decode steps, each prepared first
            for i in range(steps):  # each handed the sequence so far: 2 rows, a 5-token prompt and i tokens made
                ids = torch.zeros(2, 5 + i, dtype=torch.long)
                self.prepare_inputs_for_generation(ids, is_first_iteration=True) if i == 0 else \
                    self.prepare_inputs_for_generation(ids, next_sequence_length=1)
        return self.out

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {}


class _FakeBark:
    def __init__(self):
        self.semantic = _Stage(torch.zeros(2, 8), loops=(8,))
        self.coarse_acoustics = _Stage((torch.zeros(2, 24), torch.tensor([24, 20])), loops=(16, 8))  # two windows
        self.fine_acoustics = _Stage(torch.zeros(2, 8, 12))  # (batch, codebooks, frames)

    def codec_decode(self, codes, lengths=None):
        return [torch.zeros(3840), torch.zeros(3200)]

    def generate(self):
        sem = self.semantic.generate()
        coarse = self.coarse_acoustics.generate(sem)
        fine = self.fine_acoustics.generate(coarse)
        return self.codec_decode(fine)


def test_stage_tracker_counts_and_unwraps():
    model = _FakeBark()
    clock = trackers.Clock(torch.device("cpu"))
    with trackers.StageTracker(model, clock) as tracker:
        model.generate()
        model.generate()
        assert "generate" in model.semantic.__dict__ and "codec_decode" in model.__dict__
    record = tracker.as_dict()
    assert {s: r["tokens"] for s, r in record.items()} == {
        "semantic": [8, 8], "coarse": [24, 24], "fine": [96, 96], "decode": [7040, 7040]}
    assert all(len(r["seconds"]) == 2 and all(x >= 0 for x in r["seconds"]) for r in record.values())
    # decode steps: each loop's steps after its prefill, but its last (no next start ends it)
    assert record["semantic"]["decode_steps"] == [6, 6] and record["coarse"]["decode_steps"] == [20, 20]
    # and the cache positions those counted steps attend to: 2 rows x (5 + i) for steps i = 1..6 of the semantic
    # loop; 1..14 and 1..6 of the coarse windows
    assert record["semantic"]["decode_cache_positions"] == [102, 102]
    assert record["coarse"]["decode_cache_positions"] == [350 + 102] * 2
    for stage in ("semantic", "coarse"):
        assert all(0 <= d <= s for d, s in zip(record[stage]["decode_seconds"], record[stage]["seconds"]))
    assert "decode_steps" not in record["fine"]
    # back to the class methods: nothing timed any more
    for owner, name in ((model.semantic, "generate"), (model.coarse_acoustics, "generate"),
                        (model.fine_acoustics, "generate"), (model, "codec_decode")):
        assert name not in owner.__dict__
    assert "prepare_inputs_for_generation" not in model.semantic.__dict__
    model.generate()
    assert tracker.as_dict()["semantic"]["tokens"] == [8, 8]


def test_clock_measure_appends_seconds():
    clock = trackers.Clock(torch.device("cpu"))
    sink = []
    with clock.measure(sink):
        sum(range(1000))
    with clock.measure(sink):
        pass
    assert len(sink) == 2 and all(isinstance(x, float) and x >= 0 for x in sink)


@pytest.mark.parametrize("probed_call_s,stops", [(1e-4, True), (1e4, False)])
def test_a_variant_that_cannot_pay_off_here_stops_after_a_warm_up_slower_than_the_baseline(
        tiny_checkpoint, tmp_path, monkeypatch, probed_call_s, stops):
    """On a CPU without native bf16 (its features made so), bf16 whose warm-up call is slower than the run's probe
    of the baseline is not timed further: too_slow, its warm-up kept, saying why; faster than it, it is timed."""
    import json

    from barkbench.protocol import BASELINE_CALL_ENV

    monkeypatch.setattr(runner.provenance, "cpu_features", lambda: ["avx2"])
    monkeypatch.setenv(BASELINE_CALL_ENV, json.dumps({TINY: [probed_call_s, 1]}))
    result = runner.run(_request("sdpa+bf16", _protocol(min_iterations=2, max_iterations=2, do_sample=False)),
                        tmp_path / "bf16.json")
    if stops:
        assert result.status == "too_slow" and result.timing.stopped_by == "too_slow"
        assert result.reason.startswith("too slow here: bf16 needs avx512_bf16 or amx_bf16 to pay off on a CPU")
        assert "the baseline's (the run's probe): not timed further" in result.reason
        assert result.iterations is None and len(result.timing.warmup_s) == 1
    else:
        assert result.status == "ok" and len(result.iterations.latency_s) == 2
    monkeypatch.setenv(BASELINE_CALL_ENV, json.dumps({"synthetic:bark": [probed_call_s, 1]}))  # another model's
    assert runner.run(_request("sdpa+bf16", _protocol(min_iterations=1, max_iterations=1, do_sample=False)),
                      tmp_path / "other.json").status == "ok"
