"""One benchmark run: load -> apply variant -> warm up -> timed calls -> result record (-> JSON + WAV).

Timed calls run until max_iterations, or, once min_iterations are done, until the timed calls took
budget_s in all or the next call would likely cross the job's time limit (stopped_by). The time limit
(the protocol's, or what is left before $BARKBENCH_DEADLINE when that is sooner) is also enforced by
SIGALRM: a job cut short before min_iterations is recorded as failed, with where it stood.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import calibration, compile_counters, energy, models, provenance, results, variants
from .jobwrap import (Job, cannot_pay_off_in_this_run, failure_reason, job_time_limit, now, probed_baseline_call,
                      quiet_transformers, run_job, secs, use_threads)
from .protocol import TIMED_BUDGET_ENV, Protocol
from .records import Iterations, Latency, Memory, RunResult, Stage, Summary, Throughput, Timing
from .trackers import Clock, PeakRSS, StageTracker, TimeLimit, TimeLimitExceeded, rss_bytes, stage_timer_cost

COLD_CACHE = "cold (fresh per-run inductor cache)"


@dataclass
class RunRequest:
    model: str
    variant: str
    protocol: Protocol
    device: str = "auto"
    offline_fallback: str | None = None
    instrument_stages: bool = True
    config_hash: str | None = None
    fail_with: str | None = None  # inject a failure inside the run (tests, and checking a workflow goes on)
    threads: int | None = None  # None: all physical cores (schedulers often export OMP_NUM_THREADS=1)
    retry_of: str | None = None  # set by the workflow when it re-attempts a failed run


@contextmanager
def cold_compile_cache():
    """A fresh inductor (and triton) cache for this run, removed after it: compile time is always
    measured cold (a warm cache once hid a 23-minute compile)."""
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="barkbench-compile-cache-", ignore_cleanup_errors=True) as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def base_result(req: RunRequest, device: torch.device, variant: variants.Variant) -> RunResult:
    """The record of a run before it measures anything; the run fills it in."""
    return RunResult(
        schema_version=results.SCHEMA_VERSION, status="ok", reason=None, error=None,
        model={"requested": req.model, "id": None, "weights": None, "architecture": None},
        variant={"name": variant.name, "optimizations": variant.names,
                 "descriptions": {o.name: o.summary for o in variant.optimizations}, "notes": []},
        device={"type": device.type, "name": str(device)},
        hardware=provenance.hardware(device), versions=provenance.versions(),
        git_commit=provenance.git_commit(), config_hash=req.config_hash, retry_of=req.retry_of,
        protocol=req.protocol.to_dict(), instrumented=req.instrument_stages,
        timing=None, iterations=None, summary=None, memory=None, throughput=None,
        audio=None, started_at=now(), finished_at=None, extra={},
    )


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    from scipy.io import wavfile

    buf = io.BytesIO()
    wavfile.write(buf, sample_rate, np.asarray(audio, dtype=np.float32))
    return buf.getvalue()


def _audio_lengths(output, batch_size: int) -> list[int]:
    audio, lengths = output if isinstance(output, tuple) else (output, None)
    if lengths is None:
        return [int(audio.shape[-1])] * batch_size
    return [int(v) for v in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]


@dataclass
class Loaded:
    model: object
    call: Callable  # one seeded generate call on the protocol's batch
    sample_rate: int
    load_s: float
    rss_after_load: int


@dataclass
class Timed:
    latency_s: list[float]
    audio_s: list[float]
    stages: dict | None
    wav: bytes | None
    stopped_by: str
    peak_rss: PeakRSS
    energy: dict | None = None  # energy.record
    compiled: dict | None = None  # compile_counters.counting of the timed calls (compiled variants)
    read_bandwidth: list[float] | None = None  # before the first call and after each (CPU)
    fine_gemm: list[float] | None = None  # the GEMM throughput of the fine stage's format, as read_bandwidth


def load_model(req: RunRequest, result: RunResult, variant: variants.Variant, device: torch.device, job: Job) -> Loaded:
    """Load the checkpoint, apply the variant, and prepare the generate call."""
    proto = req.protocol
    source = models.resolve(req.model, req.offline_fallback)
    result.model.update(id=source.id, weights=source.weights, architecture=source.architecture)
    load_start = time.perf_counter()
    try:
        loaded = models.load(source, **variant.load_kwargs(device))
        model, processor = loaded.model, loaded.processor
        ctx = variants.Context(device=device)
        if device.type == "cpu":
            models.materialize(model)
        if not variant.places_model:
            model.to(device)
        variant.apply(model, ctx)
        models.release_memory()
        load_s = time.perf_counter() - load_start
        inputs = processor(proto.batch_prompts(), return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
    except TimeLimitExceeded:
        raise job.exceeded(f"while loading the model (after {secs(time.perf_counter() - load_start)} s)") from None
    result.variant["notes"] = ctx.notes
    # what each stage must at least read or compute, for the report's floors (barkbench.calibration)
    try:
        result.model["stage_work"] = calibration.stage_work(model)
    except Exception as exc:  # a model the floors do not know (another stack, a foreign layer): no floors, the run goes on
        result.model["stage_work"] = None
        ctx.notes.append(f"no stage floors: {type(exc).__name__}: {exc}"[:300])
    if device.type == "cpu":  # a decode step's matmuls alone, on this model's matrices (beside the floors)
        try:
            result.model["decode_matmuls"] = {
                stage: calibration.decode_matmuls_seconds(sub, proto.batch_size)
                for stage, sub in (("semantic", model.semantic), ("coarse", model.coarse_acoustics))}
        except Exception as exc:
            ctx.notes.append(f"no matmuls alone: {type(exc).__name__}: {exc}"[:300])
        models.release_memory()  # its inputs and sessions are gone before the timed calls' memory is sampled
    result.model.update(parameters=models.parameter_count(model), weights_bytes=models.weights_bytes(model))
    kwargs = {**proto.generate_kwargs(), **ctx.generate_kwargs}

    def call():
        from transformers import set_seed

        set_seed(proto.seed)  # as the 2023 study: the same seed before every call
        with torch.inference_mode():
            return model.generate(**inputs, **kwargs)

    return Loaded(model, call, int(model.generation_config.sample_rate), load_s, rss_bytes())


def warm_up(loaded: Loaded, proto: Protocol, label: str, clock: Clock, job: Job) -> list[float]:
    """The untimed calls (at least one); a compiled variant compiles in the first."""
    warmup_s: list[float] = []
    for i in tqdm(range(proto.warmup), desc=f"{label} warm-up", file=sys.stderr):
        start = time.perf_counter()
        try:
            with clock.measure(warmup_s):
                loaded.call()
        except TimeLimitExceeded:
            which = "first call" if i == 0 else f"warm-up call {i + 1} of {proto.warmup}"
            running = secs(time.perf_counter() - start)
            raise job.exceeded(f"during warm-up/compilation ({which} still running after {running} s)") from None
    return warmup_s


def timed_budget_s(proto: Protocol) -> float:
    """The protocol's budget of timed calls, or the run's shorter one when the workflow fitted its run budget."""
    fitted = os.environ.get(TIMED_BUDGET_ENV)
    return min(proto.budget_s, float(fitted)) if fitted else proto.budget_s


def cannot_pay_off_here(req: RunRequest, variant: variants.Variant, device: torch.device,
                        warmup_call_s: float) -> str | None:
    """Why a variant that cannot pay off on this CPU (`Optimization.pays_off_on`) is not timed further: its warm-up
    call was slower than the run's probe of the baseline ($BARKBENCH_BASELINE_CALL_S). None: time it."""
    why = cannot_pay_off_in_this_run(variant, device, req.model)
    if not why:
        return None
    probed = probed_baseline_call(req.model)
    baseline = probed[0] * req.protocol.batch_size / probed[1]
    if warmup_call_s <= baseline:
        return None
    return (f"too slow here: {why}; its warm-up call took {secs(warmup_call_s)} s, {warmup_call_s / baseline:.1f}x "
            f"the baseline's (the run's probe): not timed further")


def stop_reason(proto: Protocol, latencies: list[float], job: Job, warmup_guess: float | None = None) -> str | None:
    """Why no further timed call starts; None: one more. "too_slow": the calls so far (before the first, the
    warm-up call, `warmup_guess`) show that the minimum number of timed calls cannot end within the time limit."""
    n = len(latencies)
    if n >= proto.max_iterations:
        return "max_iterations"
    if n < proto.min_iterations:
        per_call = float(np.median(latencies)) if latencies else warmup_guess
        if per_call is not None and job.elapsed() + (proto.min_iterations - n) * per_call > job.limit_s:
            return "too_slow"
        return None
    if sum(latencies) >= timed_budget_s(proto):
        return "budget"
    if job.elapsed() + float(np.median(latencies)) > job.limit_s:
        return "time_limit"
    return None


def timed_loop(req: RunRequest, loaded: Loaded, label: str, device: torch.device, clock: Clock,
               job: Job, warmup_guess: float | None = None, read_kernel: str | None = None,
               gemm: tuple[str, str | None] | None = None) -> Timed:
    """The timed calls, until stop_reason says so or the time limit fires (kept once min_iterations are done). With
    `read_kernel` (CPU), the read bandwidth before the first call and after each, and with `gemm` (a number format, the
    fine stage's, and its kernel) that GEMM's throughput, untimed and unsampled by the peak memory: the floors of the
    calls' time (barkbench.calibration)."""
    proto = req.protocol
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    latencies: list[float] = []
    audio_s: list[float] = []  # appended last: a call counts once its audio is recorded
    joules: list[float] = []
    stages = StageTracker(loaded.model, clock) if req.instrument_stages else None
    wav = None
    counter = energy.counter_for(device)
    counting = compile_counters.counting() if variants.parse(req.variant).compiles else nullcontext()
    bandwidth: list[float] = []
    gemm_rates: list[float] = []
    with PeakRSS() as rss, counting as compiled, tqdm(total=proto.max_iterations, desc=label, file=sys.stderr) as bar:

        def probe():
            if read_kernel:
                with rss.paused():
                    bandwidth.append(calibration.read_bandwidth_now(read_kernel))
                    if gemm:
                        gemm_rates.append(calibration.gemm_rate_now(*gemm))

        try:
            probe()
            while (stopped_by := stop_reason(proto, latencies, job, warmup_guess)) is None:
                if req.fail_with:
                    raise RuntimeError(req.fail_with)
                start = counter.read() if counter else None
                with stages if stages else nullcontext():
                    with clock.measure(latencies):
                        output = loaded.call()
                if counter:
                    joules.append(counter.joules(start, counter.read()))
                lengths = _audio_lengths(output, proto.batch_size)
                if wav is None:
                    audio = output[0] if isinstance(output, tuple) else output
                    wav = wav_bytes(audio[0, : lengths[0]].float().cpu().numpy(), loaded.sample_rate)
                audio_s.append(float(np.mean(lengths)) / loaded.sample_rate)
                bar.update()
                probe()
        except TimeLimitExceeded:
            if len(audio_s) < proto.min_iterations:
                raise job.exceeded(f"after {len(audio_s)} of min {proto.min_iterations} timed calls") from None
            stopped_by = "time_limit"
    n = len(audio_s)
    return Timed(latencies[:n], audio_s, stages.as_dict(n) if stages else None, wav, stopped_by, rss,
                 energy.record(counter, joules[:n], proto.batch_size, audio_s), compiled,
                 bandwidth[:n + 1] if read_kernel else None, gemm_rates[:n + 1] if read_kernel and gemm else None)


def summarize_run(result: RunResult, req: RunRequest, variant: variants.Variant, device: torch.device, clock: Clock,
                  job: Job, loaded: Loaded, warmup_s: list[float], timed: Timed, warmup_counts: dict | None = None) -> None:
    """The result's timing, iterations, summary, memory and throughput."""
    proto, latencies = req.protocol, timed.latency_s
    job_s = job.elapsed()
    median = float(np.median(latencies))
    compiled = any(o.group == "compile" for o in variant.optimizations)  # compile, or another backend (ov)
    audio_mean = float(np.mean(timed.audio_s))
    result.timing = Timing(load_s=loaded.load_s, warmup_s=warmup_s, first_call_s=warmup_s[0],
                           first_call_overhead_s=warmup_s[0] - median,
                           # the first call of a compiled variant compiles: first call minus a steady-state call
                           compile_s=max(0.0, warmup_s[0] - median) if compiled else None,
                           compile_cache=COLD_CACHE if compiled else None,
                           stopped_by=timed.stopped_by, timed_s=float(sum(latencies)),
                           timed_budget_s=timed_budget_s(proto), job_s=job_s,
                           time_limit_s=job.limit_s, time_limit_source=job.limit_source,
                           stage_timer_overhead_s=stage_timer_cost(clock) if timed.stages else None)
    result.iterations = Iterations(latency_s=latencies, audio_s=timed.audio_s,
                                   semantic_tokens=timed.stages["semantic"]["tokens"] if timed.stages else [],
                                   stages={k: Stage(**v) for k, v in timed.stages.items()} if timed.stages else None,
                                   read_bandwidth_bytes_per_s=timed.read_bandwidth,
                                   fine_gemm_flops_per_s=timed.fine_gemm)
    result.summary = Summary(latency_s=Latency.from_values(latencies))
    cuda = device.type == "cuda"
    result.memory = Memory(peak_rss_bytes=int(timed.peak_rss.peak), peak_anon_rss_bytes=timed.peak_rss.peak_anon,
                           rss_after_load_bytes=int(loaded.rss_after_load),
                           cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
                           cuda_peak_reserved_bytes=torch.cuda.max_memory_reserved(device) if cuda else None,
                           weights_bytes=result.model["weights_bytes"])
    result.throughput = Throughput.of_calls(proto.batch_size, median, audio_mean)
    result.hardware["torch_threads"] = torch.get_num_threads()
    result.extra["energy"] = timed.energy
    if timed.compiled is not None:
        result.extra["compiled"] = compile_counters.summary(warmup_counts, timed.compiled, len(latencies))


def measure(req: RunRequest, result: RunResult, variant: variants.Variant, device: torch.device, job: Job) -> bytes | None:
    """Fill `result` with the measurement; returns the WAV of the first timed call's first sample."""
    clock = Clock(device)
    label = f"{variant.name} bs{req.protocol.batch_size}"
    with TimeLimit(job.limit_s - job.elapsed()):
        loaded = load_model(req, result, variant, device, job)
        compiled = variant.compiles
        with compile_counters.counting() if compiled else nullcontext() as warmup_counts:
            warmup_s = warm_up(loaded, req.protocol, label, clock, job)
        # the last warm-up call predicts a timed one, except a compiled variant's only one (it compiled)
        guess = None if compiled and len(warmup_s) < 2 else warmup_s[-1]
        early = None if guess is None else cannot_pay_off_here(req, variant, device, guess)
        cal = result.hardware.get("calibration") if device.type == "cpu" else None
        fine_format = calibration.fine_gemm_format(result.model.get("stage_work")) if cal else None
        timed = Timed([], [], None, None, "too_slow", None, None, None) if early else timed_loop(
            req, loaded, label, device, clock, job, guess, calibration.fastest_read_kernel(cal),
            (fine_format, calibration.fastest_gemm_kernel(cal, fine_format)) if fine_format else None)
    if timed.stopped_by == "too_slow":
        n, need = len(timed.latency_s), req.protocol.min_iterations
        per_call = float(np.median(timed.latency_s)) if n else warmup_s[-1]
        why = early or (f"too slow: {need} timed calls of ~{secs(per_call)} s cannot end within the "
                        f"{secs(job.limit_s)} s time limit; stopped after {n} timed call{'s' if n != 1 else ''}"
                        + ("" if n else " (warm-up only)"))
        result.status, result.reason = "too_slow", why
        if not n:
            result.timing = Timing(load_s=loaded.load_s, warmup_s=warmup_s, first_call_s=warmup_s[0],
                                   first_call_overhead_s=None, compile_s=None, stopped_by="too_slow",
                                   timed_s=0.0, job_s=job.elapsed(), time_limit_s=job.limit_s,
                                   time_limit_source=job.limit_source)
            return None
    summarize_run(result, req, variant, device, clock, job, loaded, warmup_s, timed, warmup_counts)
    return timed.wav


def run(req: RunRequest, out_json: str | Path) -> RunResult:
    """Benchmark one model x variant x batch size and write its JSON (and WAV). Never raises for a
    failure inside the run: that is recorded as status 'failed' so other runs go on."""
    job = job_time_limit(req.protocol.time_limit_s, time.time())
    quiet_transformers()
    variant = variants.parse(req.variant)
    device = provenance.resolve_device(req.device)
    use_threads(req.threads)
    out_json = Path(out_json)
    result = base_result(req, device, variant)
    wav = None

    def work():
        nonlocal job, wav
        if device.type == "cpu":  # the machine's floor, on the job's threads, before the model takes memory
            result.hardware["calibration"] = calibration.measure()
            job = job_time_limit(req.protocol.time_limit_s, time.time())  # the time limit is the measurement's
        with cold_compile_cache():
            wav = measure(req, result, variant, device, job)

    def failure(exc: BaseException) -> dict:
        return {"reason": str(exc)[:500] if isinstance(exc, TimeLimitExceeded) else failure_reason(exc),
                "error": {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()},
                "timing": None, "iterations": None, "summary": None, "memory": None, "throughput": None}

    if not run_job(result, job, variant.not_applicable_reason(device), work, failure):
        result.model.update(_describe_source(req))
    if wav is not None:
        wav_path = out_json.with_suffix(".wav")
        results.write_atomic(wav_path, wav)
        result.audio = {"sample_rate": 24_000, "wav": wav_path.name}
    result.save_json(out_json)  # validated when written
    return result


def _describe_source(req: RunRequest) -> dict:
    """Model fields of a run that never loads: what would have run, without touching the network."""
    if req.model.startswith(models.SYNTHETIC_PREFIX):
        arch = req.model[len(models.SYNTHETIC_PREFIX):]
        return {"id": req.model, "weights": "synthetic", "architecture": arch}
    return {"id": req.model, "weights": None, "architecture": models.HUB_MODELS.get(req.model, "local")}
