"""Shared fixtures: a factory for run JSONs (matching the engine's schema) and a small results tree."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # let the tests run from a checkout without installing the package
    sys.path.insert(0, str(SRC))

from barkbench import layout  # noqa: E402
from barkbench.results import SCHEMA_VERSION as RUN_SCHEMA_VERSION  # noqa: E402
from barkbench.stats import summarize  # noqa: E402

# No network in tests: set before huggingface_hub / transformers are imported (they read it at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The test workers share the cores with the jobs the workflow tests start (each on every physical core): OpenMP
# threads that spin while they wait stall a neighbour's parallel regions (a tiny job's call took 1.5 s beside one
# busy core instead of 0.85 s with passive waiting). The tests time nothing; the benchmark's own runs keep the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from barkbench import attention  # noqa: E402  (imports transformers: after the lines above)

PROMPTS = ["Let's try generating speech, with Bark, a text-to-speech model", "Wow, batching is so great!"]


def make_run_json(tmp_path, variant, batch_size, latencies, status="ok", *, reason=None, hardware="cpu-test-xeon",
                  model="suno/bark-small", weights="synthetic", device="cpu", optimizations=None, peak_rss_mb=1000.0,
                  cuda_peak_mb=None, length_mode="fixed", semantic_tokens=None, results_dir=None, wav=True,
                  subdir=None, rep=None, machine=None, max_new_tokens=64, versions=None, git_commit="abc1234",
                  instrumented=True, process=1, control=False, config_hash="cafe") -> Path:
    """Write process `process` of a cell, `results/<hardware>/<model-slug>/<variant>/bs<N>/rep<process>.json`
    (plus a tiny WAV when ok), and return its path. `control=True`: the A/A control's folder instead of the
    variant's; `subdir` (e.g. overhead/<variant>): `<subdir>/bs<N>.json`; `rep=K`: `repro/<variant>/rep<K>.json`.
    """
    results = Path(results_dir) if results_dir else Path(tmp_path) / "results"
    slug = layout.slug(model)
    if rep is not None:
        folder, name = results / hardware / slug / "repro" / variant, f"rep{rep}"
    elif subdir is not None:
        folder, name = results / hardware / slug / subdir, f"bs{batch_size}"
    else:
        folder = results / hardware / slug / ("control" if control else variant) / f"bs{batch_size}"
        name = f"rep{process}"
    folder.mkdir(parents=True, exist_ok=True)
    if optimizations is None:
        optimizations = [] if variant == "eager" else variant.split("+")
    ok = status == "ok"
    n = len(latencies)
    lat = [float(x) for x in latencies]
    sem = semantic_tokens if semantic_tokens is not None else [64] * n
    stage_share = {"semantic": 0.4, "coarse": 0.4, "fine": 0.15, "decode": 0.05}
    wav_name = None
    if ok and wav:
        wav_name = f"{name}.wav"
        t = np.linspace(0, 0.05, 1200, endpoint=False)
        wavfile.write(folder / wav_name, 24000, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    data = {
        "schema_version": RUN_SCHEMA_VERSION,
        "status": status,
        "reason": reason,
        "error": None if status != "failed" else {"type": "RuntimeError", "message": reason or "", "traceback": "..."},
        "model": {"requested": model, "id": "synthetic:bark-small" if weights == "synthetic" else model,
                  "weights": weights, "architecture": "bark-small", "parameters": 1000, "weights_bytes": 4_000_000},
        "variant": {"name": variant, "optimizations": optimizations},
        "device": {"type": device, "name": "Test CPU" if device == "cpu" else "Test GPU"},
        "hardware": {"id": machine or hardware, "cpu_model": "Intel Test Xeon", "cpu_features": ["avx2", "avx512f"], "cpu_cores": 2, "ram_bytes": 8 * 2**30,
                     "gpu_name": None if device == "cpu" else "NVIDIA Test", "gpu_driver": None,
                     "gpu_compute_capability": None, "torch_threads": 2},
        "versions": versions or {"python": "3.11.0", "torch": "2.0.0", "transformers": "4.40.0", "accelerate": "0.30.0",
                                 "optimum": None, "barkbench": "0.1.0"},
        "git_commit": git_commit, "config_hash": config_hash, "retry_of": None, "instrumented": instrumented,
        "protocol": {"warmup": 1, "min_iterations": 2, "max_iterations": 10, "budget_s": 20.0, "time_limit_s": 400.0,
                     "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                     "length_mode": length_mode, "do_sample": True, "fine_temperature": 0.4,
                     "coarse_temperature": 0.8, "seed": 0, "prompts": PROMPTS},
        "timing": {"load_s": 1.5, "warmup_s": [lat[0] * 1.2], "first_call_s": lat[0] * 1.2,
                   "first_call_overhead_s": lat[0] * 0.2, "compile_s": None, "stopped_by": "budget",
                   "timed_s": sum(lat), "job_s": sum(lat) * 1.5, "time_limit_s": 400.0,
                   "time_limit_source": "protocol", "stage_timer_overhead_s": 2e-5} if ok else None,
        "iterations": {
            "latency_s": lat,
            "audio_s": [2.0] * n,
            "semantic_tokens": sem,
            # semantic and coarse: three quarters of the stage in 90 decode steps, the rest the prefill
            "stages": {st: {"seconds": [x * f for x in lat], "tokens": [100] * n,
                            **({"decode_seconds": [0.75 * x * f for x in lat], "decode_steps": [90] * n,
                                  "decode_cache_positions": [90 * 300] * n}
                               if st in ("semantic", "coarse") else {})} for st, f in stage_share.items()},
        } if ok else None,
        "summary": {"latency_s": summarize(lat)} if ok else None,
        "memory": {"peak_rss_bytes": int(peak_rss_mb * 1e6), "rss_after_load_bytes": int(peak_rss_mb * 0.8e6),
                   "cuda_peak_allocated_bytes": int(cuda_peak_mb * 1e6) if cuda_peak_mb else None,
                   "cuda_peak_reserved_bytes": None, "weights_bytes": 4_000_000} if ok else None,
        "throughput": {"samples_per_s": batch_size / float(np.median(lat)), "audio_s_per_s": 2.0 * batch_size / float(np.median(lat)),
                       "rtf": float(np.median(lat)) / (2.0 * batch_size)} if ok else None,
        "audio": {"sample_rate": 24000, "wav": wav_name},
        "started_at": "2024-01-01T00:00:00", "finished_at": "2024-01-01T00:01:00",
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def results_tree(tmp_path):
    """A small results tree: eager/sdpa at bs 1 and 2 in two processes each, the A/A control at bs 1 and 2,
    one not_applicable and one failed cell."""
    paths = []
    # process k of each cell: factor f[k - 1] (the second round ~2 % slower, with a spread between cells)
    f = {"eager1": (1.0, 1.02), "control1": (1.0, 1.03), "sdpa1": (1.0, 1.01),
         "eager2": (1.0, 1.025), "control2": (1.01, 1.02), "sdpa2": (1.0, 1.015)}
    for k in (1, 2):
        paths += [
            make_run_json(tmp_path, "eager", 1, [10.0 * f["eager1"][k - 1]] * 5, process=k),
            make_run_json(tmp_path, "eager", 1, [10.0 * f["control1"][k - 1]] * 5, process=k, control=True),
            make_run_json(tmp_path, "sdpa", 1, [5.0 * f["sdpa1"][k - 1]] * 5, peak_rss_mb=800.0, process=k),
            make_run_json(tmp_path, "eager", 2, [x * f["eager2"][k - 1] for x in (12.0, 12.5, 11.8, 12.2, 12.1)],
                          process=k),
            make_run_json(tmp_path, "eager", 2, [x * f["control2"][k - 1] for x in (12.1, 12.4, 11.9, 12.2, 12.0)],
                          process=k, control=True),
            make_run_json(tmp_path, "sdpa", 2, [x * f["sdpa2"][k - 1] for x in (9.0, 9.4, 8.8, 9.1, 9.2)],
                          peak_rss_mb=900.0, process=k),
        ]
    paths += [
        make_run_json(tmp_path, "fp16", 1, [], status="not_applicable", reason="not applicable on cpu: needs CUDA"),
        make_run_json(tmp_path, "offload", 1, [], status="failed", reason="RuntimeError: boom"),
    ]
    return tmp_path / "results", paths


# --- engine fixtures (synthetic:tiny only; tests of models, variants, runner, CLI, fidelity) ---

TINY = "synthetic:tiny"


@pytest.fixture(scope="session", autouse=True)
def barkbench_cache(tmp_path_factory):
    """A session-wide synthetic checkpoint cache (BARKBENCH_CACHE) and an offline hub for every test."""
    cache = tmp_path_factory.mktemp("barkbench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BARKBENCH_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield cache


# torch intra-op threads of the engine tests (in-process and `--threads` of CLI runs). One thread: the
# machine is shared with benchmarks, and with two OpenMP threads a busy neighbour core stalls every
# parallel region (a tiny generation went from 0.3 s to 13 s); with one it is at worst shared fairly.
TORCH_THREADS = 1


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield TORCH_THREADS
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(barkbench_cache, torch_threads):
    """The synthetic:tiny checkpoint folder, built once per session into the session cache
    (and torch on TORCH_THREADS threads for the tests that run it)."""
    from barkbench import models

    path = models.build_synthetic("tiny")
    assert path.parent == barkbench_cache
    return path


# --- not applicable is a skip, never a pass (tests/test_cuda.py) ---

EXPECT_ENV = "BARKBENCH_EXPECT"  # optimizations this node must run, e.g. fa2,nf4: their skip is a failure


def expected_optimizations() -> set[str]:
    from barkbench import variants

    names = {n.strip() for n in os.environ.get(EXPECT_ENV, "").split(",") if n.strip()}
    unknown = sorted(names - set(variants.REGISTRY))
    if unknown:
        pytest.fail(f"{EXPECT_ENV}: unknown optimization {', '.join(unknown)}; known: {', '.join(variants.REGISTRY)}")
    return names


def skip_not_applicable(variant: str, reason: str):
    """Skip with the variant's reason; fail instead when $BARKBENCH_EXPECT names one of its optimizations."""
    from barkbench import variants

    expected = sorted(expected_optimizations() & set(variants.parse(variant).names))
    if expected:
        pytest.fail(f"{variant} is not applicable here, but {EXPECT_ENV} expects {', '.join(expected)}: {reason}")
    pytest.skip(reason)


# --- a model with its variant applied, and the tokens of its stages --------------------------------------

SHORT_WINDOW = 24  # a coarse sliding window this short (Bark's is 60) makes a short generation span several
DECODE_TOKENS = 12  # semantic tokens: 36 coarse tokens, so the coarse model runs more than its first short window


def load_variant(variant_name: str, model: str = TINY, device=None, window: int | None = None):
    """A model loaded and its variant applied, as the runner does (on `device`, CPU by default); `window`: the
    coarse sliding window shortened to that many tokens first."""
    import torch

    from barkbench import models, variants

    device = device or torch.device("cpu")
    variant = variants.parse(variant_name)
    loaded = models.load(models.resolve(model), **variant.load_kwargs(device))
    if window is not None:
        loaded.model.generation_config.coarse_acoustics_config["sliding_window_len"] = window
    loaded.model.to(device)
    variant.apply(loaded.model, variants.Context(device=device))
    return loaded


def load_short_window(variant_name: str, model: str = TINY, device=None):
    """`load_variant` with the coarse sliding window shortened to SHORT_WINDOW (tests of the decode loops across
    windows)."""
    return load_variant(variant_name, model, device, window=SHORT_WINDOW)


def stage_tokens(loaded_model, prompts, do_sample: bool, fixed_length: bool = True, tokens: int = DECODE_TOKENS,
                 device=None) -> dict:
    """Semantic, coarse and fine tokens and the audio of one seeded BarkModel.generate call, captured per stage."""
    import torch
    from transformers import set_seed

    model, processor = loaded_model.model, loaded_model.processor
    captured = {}
    for stage, sub in {"semantic": model.semantic, "coarse": model.coarse_acoustics,
                       "fine": model.fine_acoustics}.items():
        def capture(*args, _stage=stage, _original=sub.generate, **kwargs):
            out = _original(*args, **kwargs)
            captured[_stage] = (out[0] if isinstance(out, tuple) else out).clone()
            return out

        sub.generate = capture
    inputs = {k: v.to(device or torch.device("cpu")) for k, v in processor(prompts, return_tensors="pt").items()}
    length = {"semantic_min_new_tokens": tokens} if fixed_length else {}  # as Protocol.generate_kwargs
    set_seed(0)
    try:
        with torch.inference_mode():
            audio, _ = model.generate(**inputs, do_sample=do_sample, semantic_max_new_tokens=tokens, **length,
                                      coarse_temperature=0.8, fine_temperature=0.4, return_output_lengths=True)
    finally:
        for sub in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
            sub.__dict__.pop("generate", None)
    captured["audio"] = audio
    return captured


# --- faulty attentions (the fidelity checks must catch them) -------------------------------------------------

def swap_attention(model, attention_class) -> None:
    """Every Bark self-attention layer of `model` (eager, as loaded) becomes an `attention_class`."""
    from barkbench import attention

    for module in model.modules():
        if type(module) is attention.BarkSelfAttention:
            module.__class__ = attention_class


class MaskIgnoredInBatches(attention.BarkSdpaAttention):
    """SDPA attention that drops the padding mask at batch size > 1, as optimum's BetterTransformer Bark layer
    does (it calls SDPA with attn_mask=None; at batch size 1 nothing is padded)."""

    def _attn(self, query, key, value, attention_mask=None, query_positions=None):
        return super()._attn(query, key, value, None if query.shape[0] > 1 else attention_mask, query_positions)


BAD_CONFIGS = [  # refused by barkbench.plan in one line, naming where (test_plan); three through the workflow (test_workflow)
    ("variants: [eager, fp16+bf16]\n", "fp16"),
    ("variants: [eager, sdpa+turbo]\n", "config: variants: unknown optimization 'turbo' in variant 'sdpa+turbo'"),
    ("batch_sizes: {cpu: [1, -8]}\n", "-8"),
    ("protocol: {cpu: {min_iterations: 0}}\n", "protocol.cpu.min_iterations"),
    ("protocol: {cuda: {length_mode: whatever}}\n", "protocol.cuda.length_mode"),
    ("protocol: {cpu: {iterations: 3}}\n", "protocol.cpu"),
    ("protocol: {sampling: {fine_temperature: 0}}\n", "protocol.sampling.fine_temperature"),
    ("baseline: bf16\n", "baseline"),
    ("batch_sizes: {cpu: [1.0]}\n", "config: batch_sizes.cpu: [1.0]"),
    ("variants: [eager, sdpa+bf16, bf16+sdpa]\n", "'sdpa+bf16' and 'bf16+sdpa' are the same optimizations"),
    ("colour: blue\n", "config: top level: Additional properties are not allowed ('colour' was unexpected)"),
    ("models: [suno/bark-huge]\n", "config: models.0: 'suno/bark-huge' does not match"),
]


def pytest_collection_modifyitems(config, items):
    """The slow (end-to-end) tests first, so that pytest-xdist's workers do not wait on one of them at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def assert_compiled_check_passes(variant: str, tmp_path) -> None:
    """The whole fidelity check of a compiled variant on synthetic:tiny (8 tokens, a fresh dynamo): status ok, its
    per-layer check run, every measure within the variant's limits."""
    import json

    import torch

    from barkbench import fidelity

    torch._dynamo.reset()
    out = tmp_path / "check.json"
    report = fidelity.run_fidelity(TINY, variant, str(out), device_name="cpu", tokens=8, threads=TORCH_THREADS)
    assert json.loads(out.read_text())["status"] == "ok", report["reason"]
    assert report["layers"]["layers"] > 0 and report["within_tolerance"] is True, report["violations"]
