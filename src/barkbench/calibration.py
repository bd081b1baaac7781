"""The machine's physical floor of each Bark stage: a short calibration of the machine (memory bandwidth, GEMM
throughput) measured in every CPU run on the job's threads, the work of each stage described from the loaded
model, and the floor they give.

- semantic and coarse decode are memory-bound: every decode step reads the sub-model's weights once (embedding
  tables excepted: one row per token), and its attention reads the keys and values of every position so far
  (per batch row: ~20 MB per step in fp32 at the default lengths, beside bark-small's 93 MB of int8 weights).
  Floor = (weight bytes x decode steps + cache bytes per position x the positions those steps attend to) / read
  bandwidth, against the time of the decode steps alone (`trackers.DecodeSteps` counts both); the prefills (a
  257-token prompt per semantic call and per coarse window) are the rest of the stage.
- the fine model is compute-bound: FLOPs of its passes over the window / GEMM throughput of its number format
  (fp32, bf16, or int8 as the int8 variants run it: torch.ao dynamic quantized Linear).
- the EnCodec decode has no floor here (convolutions and an LSTM, well under 1 % of the time).

Each run records its own calibration and stage work, so the report's floors are a pure function of the run
records: no separate calibration file, no second measurement of the same thing.
"""
from __future__ import annotations

import warnings

import time

import torch

from .fine_window import WINDOW_MULTIPLE, window_frames
from .int8_compile import CompilableDynamicLinear, is_dynamic_int8 as _is_dynamic_int8
from .int8_gemv import Int8WeightOnlyLinear

BANDWIDTH_BYTES = 256 * 2**20  # well beyond any last-level cache
GEMM_SIZE = 1024  # M = N = K


def _best_seconds(fn, budget_s: float, min_reps: int = 3) -> float:
    """Fastest of repeated calls (after one warm-up) within `budget_s`: the machine's capability, as far as a
    noisy shared machine lets one see it. A call slower than the whole budget (bf16 without native bf16 takes
    seconds) is timed once: every job runs this calibration first."""
    t0 = time.perf_counter()
    fn()
    slow = time.perf_counter() - t0 > budget_s
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < (1 if slow else min_reps) or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def gemm_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def _mlas_matmul(a: torch.Tensor, b: torch.Tensor):
    """`a @ b` by ONNX Runtime (MLAS's SGEMM) on torch's threads, as a call; None where ONNX Runtime cannot run."""
    from . import ort_runtime

    if ort_runtime.unavailable_reason() is not None:
        return None
    import onnxruntime as ort
    from onnx import TensorProto, helper

    shape = list(a.shape)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), ort_runtime.session_options(torch.get_num_threads()),
                                   providers=["CPUExecutionProvider"])
    feeds = {"a": a.numpy(), "b": b.numpy()}
    return lambda: session.run(None, feeds)


def _read_kernels(x: torch.Tensor) -> dict:
    """The read kernels over `x` (fp32, BANDWIDTH_BYTES): a sum, and an fp32 GEMV (MKL's, which prefetches)."""
    matrix, vector = x.view(4096, -1), torch.ones(x.numel() // 4096)
    return {"sum": lambda: x.sum(), "gemv_fp32": lambda: torch.mv(matrix, vector)}


def fastest_read_kernel(calibration: dict | None) -> str | None:
    """The calibration's faster read kernel (None: no calibration)."""
    by_kernel = (calibration or {}).get("read_bandwidth_by_kernel")
    return max(by_kernel, key=by_kernel.get) if by_kernel else None


def read_bandwidth_now(kernel: str, reps: int = 3) -> float:
    """Read bandwidth (bytes/s) now, by one of the calibration's read kernels: the fastest of `reps` passes over a
    fresh BANDWIDTH_BYTES tensor, freed after (~60 ms). Taken between timed calls, because what the memory gives drifts
    on a shared machine: on a 2-core cloud VM one process saw 54 GB/s for minutes, then 75 for seconds, and a decode
    step's matmuls sped up with it (2.1 -> 1.8 ms), so a floor from the job's start can belong to another state."""
    x = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
    read = _read_kernels(x)[kernel]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - t0)
    return BANDWIDTH_BYTES / best


GEMM_FORMATS = ("fp32", "bf16", "int8")  # the number formats with a GEMM kernel here (a fine floor)


def _gemm_kernels(fmt: str) -> dict:
    """The GEMM kernels (GEMM_SIZE^3) of one number format, as calls: fp32 torch.mm and, where ONNX Runtime runs,
    MLAS's; bf16 torch.mm; int8 torch.ao's dynamic Linear (activations quantized per call)."""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    if fmt == "fp32":
        kernels = {"torch": lambda: torch.mm(a, b)}
        if (mlas := _mlas_matmul(a, b)) is not None:
            kernels["onnxruntime"] = mlas
        return kernels
    if fmt == "bf16":
        a16, b16 = a.bfloat16(), b.bfloat16()
        return {"torch": lambda: torch.mm(a16, b16)}
    if fmt == "int8":
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        with warnings.catch_warnings():  # torch.ao's deprecation notice: the calibration measures what int8 runs today
            warnings.simplefilter("ignore", UserWarning)
            qlinear = DynamicLinear(GEMM_SIZE, GEMM_SIZE, dtype=torch.qint8)
        return {"torch.ao": lambda: qlinear(a)}
    raise ValueError(f"no GEMM kernel for {fmt!r} (one of {', '.join(GEMM_FORMATS)})")


def fine_gemm_format(work: dict | None) -> str | None:
    """The number format of the fine stage's GEMMs in a stage work (`stage_work`), where a kernel here has it."""
    fmt = ((work or {}).get("fine") or {}).get("gemm_dtype")
    return fmt if fmt in GEMM_FORMATS else None


def fastest_gemm_kernel(calibration: dict | None, fmt: str) -> str | None:
    """The calibration's faster fp32 GEMM kernel (torch's or ONNX Runtime's); None for the other formats (one kernel
    each) or without a calibration."""
    by_kernel = (calibration or {}).get("gemm_fp32_by_kernel") if fmt == "fp32" else None
    return max(by_kernel, key=by_kernel.get) if by_kernel else None


def gemm_rate_now(fmt: str, kernel: str | None = None, reps: int = 3) -> float:
    """GEMM throughput (FLOP/s) of one number format now: its kernels (`kernel`: that one only, as
    `fastest_gemm_kernel` names it) built afresh and freed after, one warm-up call each, then the fastest of `reps`
    calls (on a 2-core Zen 5: ~15 ms, fp32 by ONNX Runtime ~25). Taken between timed calls for the fine floor, as the
    read bandwidth for the decode floors: on that machine the start calibrations' int8 GEMM ranged 685-1788 GFLOP/s
    over one run's jobs."""
    kernels = _gemm_kernels(fmt)
    if kernel is not None:
        kernels = {kernel: kernels[kernel]}
    best = float("inf")
    for call in kernels.values():
        call()
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
    return gemm_flops(GEMM_SIZE, GEMM_SIZE, GEMM_SIZE) / best


def measure(budget_s: float = 0.1) -> dict:
    """Read bandwidth (a sum and a GEMV over a 256 MiB fp32 tensor), copy bandwidth (bytes read + written) and GEMM
    throughput (1024^3) in fp32 (torch's and, where it runs, ONNX Runtime's), bf16 and dynamic int8 Linear, on
    torch's current threads. ~6 x budget_s."""
    start = time.perf_counter()
    x = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    # The floor is a lower bound only at the fastest read any kernel achieves: a sum and an fp32 GEMV (MKL's, which
    # prefetches) over the same bytes; either can be the faster on a given machine.
    read_s = {kernel: _best_seconds(read, budget_s) for kernel, read in _read_kernels(x).items()}
    copy_s = _best_seconds(lambda: y.copy_(x), budget_s)
    del x, y
    # As the read, a format's GEMM floor is its fastest kernel's: fp32, torch's or MLAS's where ONNX Runtime runs (on a
    # 2-core Zen 5: 470 GFLOP/s against torch.mm's 220, where `finewin+ort`'s fine model ran at 0.8x a torch-only floor)
    by_kernel = {fmt: {kernel: _best_seconds(call, budget_s) for kernel, call in _gemm_kernels(fmt).items()}
                 for fmt in GEMM_FORMATS}
    flops = gemm_flops(GEMM_SIZE, GEMM_SIZE, GEMM_SIZE)
    return {
        "read_bandwidth_bytes_per_s": BANDWIDTH_BYTES / min(read_s.values()),
        "read_bandwidth_by_kernel": {kernel: BANDWIDTH_BYTES / s for kernel, s in read_s.items()},
        "copy_bandwidth_bytes_per_s": 2 * BANDWIDTH_BYTES / copy_s,
        "gemm_flops_per_s": {fmt: flops / min(seconds.values()) for fmt, seconds in by_kernel.items()},
        "gemm_fp32_by_kernel": {kernel: flops / s for kernel, s in by_kernel["fp32"].items()},
        "seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(), "quantized_engine": torch.backends.quantized.engine,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "method": f"best of repeated calls, {budget_s} s each: sum of a {BANDWIDTH_BYTES >> 20} MiB fp32 tensor and "
                  f"an fp32 GEMV over it (read: the faster), copy_ of it (read + write), {GEMM_SIZE}^3 torch.mm fp32 "
                  f"(and ONNX Runtime's MatMul where it runs: the faster) and bf16, dynamic int8 Linear (torch.ao, "
                  f"activations quantized per call)",
    }


# ---------------------------------------------------------------- what each stage does


def _linear_weight(module):
    """The weight tensor of a Linear or a torch.ao dynamic int8 Linear; None for other modules (a compilable
    wrapper's weight is its `linear`'s)."""
    if isinstance(module, torch.nn.Linear):
        return module.weight
    if _is_dynamic_int8(module) and hasattr(module, "weight"):
        return module.weight()
    return None


def bytes_read_per_step(submodel) -> int:
    """Bytes of weights one decode step reads: every parameter and quantized weight except embedding tables
    (a step reads one row of those); where another runtime runs the sub-model, those of its graph
    (`runtime_read_bytes`, or all it holds)."""
    runtime = getattr(submodel, "runtime_read_bytes", None) or getattr(submodel, "runtime_weight_bytes", None)
    if runtime is not None:
        return int(runtime)
    total = 0
    for module in submodel.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        if isinstance(module, Int8WeightOnlyLinear):  # a decode step reads the int8 weights, not their fp32 copy
            total += sum(t.numel() * t.element_size() for t in (module.weight_int8, module.scale, module.bias)
                         if t is not None)
            continue
        weight = _linear_weight(module)
        if weight is not None and _is_dynamic_int8(module):
            total += weight.numel() * weight.element_size()
            bias = module.bias()
            total += bias.numel() * bias.element_size() if bias is not None else 0
            continue
        total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return int(total)


def decode_matmuls(submodel) -> dict:
    """Each weight matmul one decode step of `submodel` runs in PyTorch: qualified name -> the module. A Linear, a
    torch.ao dynamic int8 Linear, an int8 weight-only Linear or a wrapper of one (not its insides)."""
    out = {}
    for name, module in submodel.named_modules():
        if any(name.startswith(f"{outer}.") for outer in out):
            continue
        if isinstance(module, (Int8WeightOnlyLinear, CompilableDynamicLinear)) or _linear_weight(module) is not None:
            out[name] = module
    return out


@torch.inference_mode()
def decode_matmuls_seconds(submodel, rows: int, budget_s: float = 0.1) -> dict:
    """One decode step's weight matmuls alone: each called on `rows` random rows (a step of that batch size), back to
    back, with nothing between them (no attention, norms, logits processing or generate loop); best of repeated
    passes, on torch's current threads. What the step's matmul kernels cost on matrices of this model's size, between
    the memory floor (their bytes at the read bandwidth) and the step's measured time. Where another runtime runs
    the sub-model, its own kernels in one graph (`matmuls_alone`, barkbench.ort_int8)."""
    if (runtime := getattr(submodel, "matmuls_alone", None)) is not None:
        return {"seconds": _best_seconds(runtime.step(rows), budget_s), "matmuls": runtime.count, "rows": rows}
    dtype = submodel.input_embeds_layer.weight.dtype
    calls = [(m, torch.randn(rows, m.in_features).to(dtype)) for m in decode_matmuls(submodel).values()]
    if any(t.is_meta for m, _ in calls for t in m.parameters()):  # a matmul on the meta device computes nothing
        raise ValueError("weights freed (on the meta device): no matmuls to time")

    def step():
        for module, x in calls:
            module(x)

    return {"seconds": _best_seconds(step, budget_s), "matmuls": len(calls), "rows": rows}


def cache_bytes_per_position(submodel) -> int:
    """Bytes of keys and values one cache position holds, over every layer: what a decode step's attention reads
    per position besides the weights. The cache takes the dtype of the hidden states, which the token embeddings
    set (never quantized)."""
    cfg = submodel.config
    return 2 * cfg.num_layers * cfg.hidden_size * submodel.input_embeds_layer.weight.element_size()


def gemm_dtype(submodel) -> str:
    """The number format of the sub-model's matmuls: int8 (torch.ao dynamic), or its Linear weights' dtype (int8
    weight-only: the dequantized copy its GEMMs read)."""
    for module in submodel.modules():
        if _is_dynamic_int8(module) and _linear_weight(module) is not None:
            return "int8"
        weight = module.weight_dequantized if isinstance(module, Int8WeightOnlyLinear) else (
            module.weight if isinstance(module, torch.nn.Linear) else None)
        if weight is not None:
            return str(weight.dtype).removeprefix("torch.").replace("float32", "fp32").replace(
                "bfloat16", "bf16").replace("float16", "fp16")
    return "fp32"


def fine_work(fine, passes_per_window: int, fine_window: bool) -> dict:
    """The fine model's FLOPs per frame of one pass, split into what grows with the window (Linear layers
    of the transformer plus the one lm head a pass uses) and attention (QK^T and AV: 4 x hidden per pair of
    frames, per layer)."""
    cfg = fine.config
    linear_params = 0
    for name, module in fine.named_modules():
        weight = _linear_weight(module)
        if weight is None or name.startswith("lm_heads"):
            continue
        linear_params += weight.numel()
    head = fine.lm_heads[0]
    head = head.linear if isinstance(head, CompilableDynamicLinear) else head
    head_weight = _linear_weight(head)
    linear_params += head_weight.numel() if head_weight is not None else 0
    return {"linear_flops_per_frame": 2 * linear_params,
            "attention_flops_per_frame_pair": 4 * cfg.num_layers * cfg.hidden_size,
            "passes_per_window": passes_per_window,
            "codebooks": cfg.n_codes_total,
            "window_multiple": WINDOW_MULTIPLE if fine_window else None,
            "gemm_dtype": gemm_dtype(fine)}


def stage_work(model) -> dict:
    """What each stage of this loaded (and optimized) model must at least read or compute."""
    from .fine_window import WindowedBarkFineModel

    fine, gen = model.fine_acoustics, model.generation_config
    # generate predicts the codebooks after the coarse ones, one pass each
    passes = int(gen.fine_acoustics_config["n_fine_codebooks"] - gen.coarse_acoustics_config["n_coarse_codebooks"])
    return {"semantic": {"bytes_per_step": bytes_read_per_step(model.semantic),
                         "cache_bytes_per_position": cache_bytes_per_position(model.semantic)},
            "coarse": {"bytes_per_step": bytes_read_per_step(model.coarse_acoustics),
                       "cache_bytes_per_position": cache_bytes_per_position(model.coarse_acoustics)},
            "fine": {**fine_work(fine, passes, isinstance(fine, WindowedBarkFineModel)),
                     "max_window": int(gen.fine_acoustics_config["max_fine_input_length"])}}


# ---------------------------------------------------------------- floors


def decode_floor_s(work: dict, steps: float, cache_positions: float, read_bandwidth: float) -> float:
    """Every decode step reads the weights once and its attention reads the cache so far (`cache_positions`: summed
    over the steps and batch rows)."""
    return (work["bytes_per_step"] * steps + work["cache_bytes_per_position"] * cache_positions) / read_bandwidth


def fine_flops(work: dict, frames: int, batch_size: int) -> float:
    """FLOPs of the fine stage for `frames` real frames: the passes over the window generate runs (one window
    while the frames fit in `max_window`; longer inputs slide windows, not modelled: the floor is then None)."""
    window = window_frames(frames, work["max_window"], work.get("window_multiple"))
    per_pass = work["linear_flops_per_frame"] * window + work["attention_flops_per_frame_pair"] * window * window
    return float(batch_size * work["passes_per_window"] * per_pass)


def _known(x) -> bool:
    return x is not None and x == x  # not NaN


def stage_floors(work: dict | None, calibration: dict | None, stage_steps: dict, cache_positions: dict,
                 batch_size: int) -> dict:
    """Floor seconds per stage ({semantic, coarse, fine}; None where it cannot be given) from a run's
    recorded stage work and calibration and what each stage counts (medians): semantic and coarse, their
    decode steps and the cache positions those read (a record from before positions were counted: no floor);
    fine, its codes (frames x codebooks)."""
    floors = {"semantic": None, "coarse": None, "fine": None}
    if not work or not calibration:
        return floors
    bandwidth = calibration["read_bandwidth_bytes_per_s"]
    for stage in ("semantic", "coarse"):
        steps, positions = stage_steps.get(stage), cache_positions.get(stage)
        if _known(steps) and steps and _known(positions) and "cache_bytes_per_position" in work[stage]:
            floors[stage] = decode_floor_s(work[stage], steps, positions, bandwidth)
    fine = work["fine"]
    codes = stage_steps.get("fine")
    throughput = calibration["gemm_flops_per_s"].get(fine["gemm_dtype"])
    if codes and codes == codes and throughput:
        frames = int(round(codes / fine["codebooks"]))
        if frames < fine["max_window"]:
            floors["fine"] = fine_flops(fine, frames, batch_size) / throughput
    return floors
