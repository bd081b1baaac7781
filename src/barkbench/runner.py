"""One benchmark run: load -> apply variant -> warm up -> timed calls -> result dict (-> JSON + WAV)."""
from __future__ import annotations

import io
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm import tqdm

from . import models, provenance, results, stats, variants
from .protocol import Protocol
from .trackers import Clock, PeakRSS, StageTracker, rss_bytes, stage_timer_cost


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def base_result(req: RunRequest, device: torch.device, variant: variants.Variant) -> dict:
    return {
        "schema_version": results.SCHEMA_VERSION, "status": "ok", "reason": None, "error": None,
        "model": {"requested": req.model, "id": None, "weights": None, "architecture": None},
        "variant": {"name": variant.name, "optimizations": variant.names,
                    "descriptions": {o.name: o.summary for o in variant.optimizations}, "notes": []},
        "device": {"type": device.type, "name": str(device)},
        "hardware": provenance.hardware(device), "versions": provenance.versions(),
        "git_commit": provenance.git_commit(), "config_hash": req.config_hash,
        "protocol": req.protocol.to_dict(), "instrumented": req.instrument_stages,
        "timing": None, "iterations": None, "summary": None, "memory": None, "throughput": None,
        "audio": None, "started_at": _now(), "finished_at": None,
    }


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


def measure(req: RunRequest, result: dict, variant: variants.Variant, device: torch.device) -> bytes:
    """Fill `result` with the measurement; returns the WAV of the first timed call's first sample."""
    proto = req.protocol
    clock = Clock(device)
    source = models.resolve(req.model, req.offline_fallback)
    result["model"].update(id=source.id, weights=source.weights, architecture=source.architecture)

    load_start = time.perf_counter()
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
    result["variant"]["notes"] = ctx.notes
    result["model"].update(parameters=models.parameter_count(model), weights_bytes=models.weights_bytes(model))
    rss_after_load = rss_bytes()

    inputs = processor(proto.batch_prompts(), return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    kwargs = {**proto.generate_kwargs(), **ctx.generate_kwargs}
    sample_rate = int(model.generation_config.sample_rate)

    def call():
        from transformers import set_seed

        set_seed(proto.seed)  # as the 2023 study: the same seed before every call
        with torch.inference_mode():
            return model.generate(**inputs, **kwargs)

    warmup_s: list[float] = []
    # A compiled variant always gets one untimed first call: its compilation, reported as compile_s.
    n_warmup = max(proto.warmup, 1 if "compile" in variant.names else 0)
    for _ in tqdm(range(n_warmup), desc=f"{variant.name} bs{proto.batch_size} warm-up", file=sys.stderr):
        with clock.measure(warmup_s):
            call()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    latencies: list[float] = []
    audio_s: list[float] = []
    stages = StageTracker(model, clock) if req.instrument_stages else None
    wav = None
    with PeakRSS() as rss:
        for i in tqdm(range(proto.iterations), desc=f"{variant.name} bs{proto.batch_size}", file=sys.stderr):
            if req.fail_with:
                raise RuntimeError(req.fail_with)
            if stages:
                stages.__enter__()
            try:
                with clock.measure(latencies):
                    output = call()
            finally:
                if stages:
                    stages.__exit__(None, None, None)
            lengths = _audio_lengths(output, proto.batch_size)
            audio_s.append(float(np.mean(lengths)) / sample_rate)
            if wav is None:
                audio = output[0] if isinstance(output, tuple) else output
                wav = wav_bytes(audio[0, : lengths[0]].float().cpu().numpy(), sample_rate)

    semantic_tokens = stages.tokens["semantic"] if stages else []
    median = float(np.median(latencies))
    compile_s = None
    if "compile" in variant.names and warmup_s:
        compile_s = max(0.0, warmup_s[0] - median)  # first call minus a steady-state call
    audio_mean = float(np.mean(audio_s))
    result.update(
        timing={"load_s": load_s, "warmup_s": warmup_s, "compile_s": compile_s,
                "stage_timer_overhead_s": stage_timer_cost(clock) if stages else None},
        iterations={"latency_s": latencies, "audio_s": audio_s, "semantic_tokens": semantic_tokens,
                    "stages": stages.as_dict() if stages else None},
        summary={"latency_s": stats.summarize(latencies)},
        memory={"peak_rss_bytes": int(rss.peak), "peak_anon_rss_bytes": rss.peak_anon,
                "rss_after_load_bytes": int(rss_after_load),
                "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                "cuda_peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
                "weights_bytes": result["model"]["weights_bytes"]},
        # RTF: seconds of compute per second of audio produced by one call (all samples of the batch).
        throughput={"samples_per_s": proto.batch_size / median,
                    "audio_s_per_s": proto.batch_size * audio_mean / median,
                    "rtf": median / (proto.batch_size * audio_mean)},
    )
    result["hardware"]["torch_threads"] = torch.get_num_threads()
    return wav


def run(req: RunRequest, out_json: str | Path) -> dict:
    """Benchmark one model x variant x batch size and write its JSON (and WAV). Never raises for a
    failure inside the run: that is recorded as status 'failed' so other runs go on."""
    _quiet_transformers()
    variant = variants.parse(req.variant)
    device = provenance.resolve_device(req.device)
    torch.set_num_threads(req.threads or psutil.cpu_count(logical=False) or os.cpu_count())
    out_json = Path(out_json)
    result = base_result(req, device, variant)
    wav = None
    reason = variant.not_applicable_reason(device)
    if reason:
        result.update(status="not_applicable", reason=reason)
        source = _describe_source(req)
        result["model"].update(source)
    else:
        try:
            wav = measure(req, result, variant, device)
        except models.ModelSourceError:
            raise
        except BaseException as exc:  # OOM, kernel errors, KeyboardInterrupt excluded below
            if isinstance(exc, KeyboardInterrupt):
                raise
            result.update(status="failed", reason=f"{type(exc).__name__}: {exc}".strip()[:500],
                          error={"type": type(exc).__name__, "message": str(exc),
                                 "traceback": traceback.format_exc()},
                          timing=None, iterations=None, summary=None, memory=None, throughput=None)
    result["finished_at"] = _now()
    if wav is not None:
        wav_path = out_json.with_suffix(".wav")
        results.write_atomic(wav_path, wav)
        result["audio"] = {"sample_rate": 24_000, "wav": wav_path.name}
    results.write_result(out_json, result)
    return result


def _describe_source(req: RunRequest) -> dict:
    """Model fields of a run that never loads: what would have run, without touching the network."""
    if req.model.startswith(models.SYNTHETIC_PREFIX):
        arch = req.model[len(models.SYNTHETIC_PREFIX):]
        return {"id": req.model, "weights": "synthetic", "architecture": arch}
    return {"id": req.model, "weights": None, "architecture": models.HUB_MODELS.get(req.model, "local")}
