"""The optimization registry. A variant is a '+'-joined set of optimizations, e.g. `offload+sdpa+fp16`.

Each optimization says whether it can run here (device, installed packages), what it changes at
load time (`from_pretrained` kwargs), what it does to the loaded model, the number format its reference simulation applies to the baseline
(`barkbench.references`) and the limit it is held to against that reference. Adding an optimization is one `register(...)` call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import availability, legacy


class VariantError(ValueError):
    """A variant string that names an unknown optimization or conflicting ones."""


@dataclass(frozen=True)
class Tolerance:
    """Thresholds of the fidelity measures (see `barkbench.fidelity`): teacher-forced KL divergence (nats) and max
    |Δp| of the top token, max logit error relative to the largest |logit| (scale-free: random and trained weights
    differ in logit scale by orders of magnitude), the codec's SNR on the same codes, and the share of positions
    with the same top-1 token. Free-running tokens need no bound of their own: a divergence is a fault where the
    margin exceeds twice the logit error these limits allow."""

    logits_max_rel: float
    kl_mean: float
    kl_p99: float
    max_dp_top: float
    min_snr_db: float
    note: str
    min_same_top1: float = 1.0


# fp32's own rounding, the floor of every limit: float32 eager against the same model in float64, teacher-forced on
# inputs disjoint from the check's (`python -m barkbench.noise_floor synthetic:tiny fp32`, seed 1; the
# check uses seed 0), worst over sub-models, CPU, synthetic weights: max rel logit error 3.2e-7 (tiny), KL mean
# 5.2e-16, p99 2.2e-15, |Δp| 2.3e-10. The bounds below leave a margin of >10 on the logit error (fused kernels
# reorder sums differently from eager: sdpa vs eager measured at the float64 floor, 3.2e-7).
FLOAT_ROUNDING = Tolerance(
    4e-6, 2e-12, 2e-12, 5e-8, 60.0,
    "fp32 rounding floor: float32 vs float64 eager (seed 1, CPU, synthetic:tiny) max rel logit err "
    "3.2e-7, KL mean 5.2e-16, |Δp| 2.3e-10; bounds with a margin >10. Codec: no exact variant touches it, 60 dB "
    "kept as a plain bound")


@dataclass(frozen=True)
class ImplementationLimit:
    """How far a variant may stray from the reference simulation of its number format (`barkbench.references`),
    fixed before any variant is measured. Whole model: the fp32 floor plus `model_share` times the reference's own
    distance to the baseline (logit error, |Δp|; its square for KL, which grows with the square of a logit error;
    top-1 disagreement; SNR). Each quantized Linear layer, on the same input: the fp32 floor plus `layer_share`
    times that layer's own quantization error (rounding is discontinuous: whole-model outputs of two correct
    implementations decorrelate at the level of the format's own error, single layers do not)."""

    model_share: float
    layer_share: float
    calibration: str


# Where every limit above was measured (recorded beside each verdict; a verdict elsewhere says so).
LIMITS_CALIBRATION = {"device": "cpu", "weights": "synthetic", "models": ["synthetic:tiny"],
                      "inputs": "teacher-forced random token inputs of seed 1 (the check uses seed 0) and the fault "
                                "suite on the check's own prompts"}

EXACT = ImplementationLimit(0.0, 0.0, "no lossy format: the reference is the fp32 baseline, the limit its rounding floor")
# Calibrated on synthetic:tiny (CPU), teacher-forced inputs of seed 1 (the check: seed 0), from correct implementations
# against their reference (`python -m barkbench.noise_floor synthetic:tiny sdpa+bf16 int8`): sdpa+bf16 vs eager bf16 up
# to 0.94 of the format's own logit error and 1.5 of its |Δp|; torch.ao int8 vs its fake-quant simulation: semantic and
# coarse identical, a few fine codebooks off by one activation rounding tie (0.2 of the format's logit error), every
# layer within 6e-4 of its layer limit. The fault suite (tests/test_fidelity.py, `python -m barkbench.faults`) then
# runs on the check's own inputs: every listed fault outside, every correct variant inside.
HALF_PRECISION = ImplementationLimit(
    3.0, 0.05, "half precision: any summation order is a correct bf16/fp16 implementation and lands about one format "
    "error from another (sdpa+bf16 vs eager bf16: 0.94x logit error, 1.5x |Δp|, seed 1); share 3")
INT8_WEIGHTS = ImplementationLimit(
    2.0, 0.05, "int8: one activation rounding tie decided the other way changes a whole model's output by a share of "
    "the format's error (torch.ao vs its simulation: 0.2x, seed 1): model share 2, and per layer the kernel matches "
    "the simulation to float rounding: layer share 0.05")
# ONNX Runtime's MatMulNBits on an AVX2 CPU decides a few exact activation ties (x * 127 / max|x| on a .5 in float32)
# the other way from any elementwise rounding of that product (2 rows of 2000 layer-norm outputs at K = 768), so
# its layers match the simulation to float rounding except where a tie moved one activation by one step. One such step
# moves an output by that step times one weight: about 1/sqrt(K/12) of the layer's own quantization error (the sum of
# K independent rounding errors), 0.125 at K = 768: layer share 0.25 allows two in one output. Model share as int8.
INT8_BLOCKS = ImplementationLimit(
    2.0, 0.25, "int8 blocks (MatMulNBits): the kernel decides a few exact activation ties the other way; one moves an "
    "output by ~1/sqrt(K/12) of the layer's quantization error (0.125 at K = 768): layer share 0.25, model share 2")
FOUR_BIT = ImplementationLimit(2.0, 0.05, "4-bit weights: as int8 (not calibrated on a device with bitsandbytes)")



@dataclass
class Context:
    """What an optimization may need when it is applied after loading."""

    device: torch.device
    generate_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Optimization:
    name: str
    summary: str
    group: str | None = None  # at most one optimization per group in a variant
    order: int = 50  # application order after loading
    needs_cuda: bool = False
    needs_packages: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()  # optimizations it is useless without
    load_kwargs: Callable[[torch.device], dict] | None = None
    apply: Callable[[torch.nn.Module, Context], None] | None = None
    places_model: bool = False  # it moves the model to the device itself (offload)
    reference: str | None = None  # its number format's simulation in `barkbench.references.FORMATS` (None: exact)
    limit: ImplementationLimit = EXACT
    cpu_reason: str | None = None  # why it does not run on CPU even though it could import
    cuda_reason: str | None = None  # why it does not run on CUDA (a CPU-only optimization)
    requires_why: str = ""
    cpu_conflicts: tuple[str, ...] = ()  # optimizations it cannot combine with on a CPU (why: cpu_reason)
    needs_stack: Callable[[], str | None] | None = None  # why this interpreter's stack cannot run it
    needs_on_device: Callable[[torch.device], str | None] | None = None  # what this machine lacks for it there
    # CPU instruction-set guidance: it pays off on a CPU only with at least one of these features (the
    # names of `provenance.CPU_FEATURES`); empty: pays off on any CPU. Why, for the report.
    pays_off_with: tuple[str, ...] = ()
    pays_off_why: str = ""
    # torch.compile (inductor) compiles the model at its first call: the run counts compilations and CUDA graph
    # replays, and its last warm-up call does not predict a timed one.
    compiles: bool = False
    # The run's estimate (`barkbench.estimate`): a call with it relative to one without (on a CPU where it pays
    # off), and, in calls of the baseline, what its first call and its fidelity check cost beyond the baseline's
    # (compilation, a slow reference simulation). Priors fitted on one machine's default run (bark-small, bs 1).
    call_factor: float = 1.0
    first_call_extra: float = 0.0
    fidelity_extra: float = 0.0

    def not_applicable_reason(self, device: torch.device) -> str | None:
        if self.needs_stack and (reason := self.needs_stack()):
            return reason
        if device.type == "cpu" and self.needs_cuda:
            return f"not applicable on cpu: {self.name} {self.cpu_reason or 'needs a CUDA device'}"
        if device.type == "cuda" and self.cuda_reason:
            return f"not applicable on cuda: {self.name} {self.cuda_reason}"
        if self.needs_on_device and (problem := self.needs_on_device(device)):
            return f"not applicable here: {self.name}: {problem}"
        for package in self.needs_packages:  # imported and one operation run: a broken install is not available
            if problem := availability.package_problem(package, device):
                return f"not applicable here: {self.name} needs the package '{package}', {problem}"
        return None

    def pays_off_on(self, cpu_features) -> str | None:
        """None when it can pay off on a CPU with these features; else why it cannot (it still runs)."""
        if not self.pays_off_with or set(self.pays_off_with) & set(cpu_features):
            return None
        return (f"{self.name} needs {' or '.join(self.pays_off_with)} to pay off on a CPU"
                + (f" ({self.pays_off_why})" if self.pays_off_why else ""))


REGISTRY: dict[str, Optimization] = {}


def register(opt: Optimization) -> Optimization:
    REGISTRY[opt.name] = opt
    return opt


def _transformer_submodels(model):
    return [model.semantic, model.coarse_acoustics, model.fine_acoustics]


def _apply_sdpa(model, ctx):
    from .attention import use_sdpa

    use_sdpa(model)


def _apply_offload(model, ctx):
    legacy.enable_cpu_offload(model, ctx.device.index or 0)


def _apply_bt(model, ctx):
    ctx.notes.append(f"optimum BetterTransformer: {legacy.to_bettertransformer(model)} attention layers converted")


def _apply_int8_dynamic(model, ctx):
    # Linear layers of the three transformers; EnCodec (convolutions, LSTM) stays fp32.
    from torch.ao.quantization import quantize_dynamic

    from .ort_int8 import runs

    # A sub-model another runtime runs (ortint8, applied first) keeps its fp32 Linear layers: nothing calls them.
    subs = [sub for sub in _transformer_submodels(model) if not runs(sub)]
    for sub in subs:
        quantize_dynamic(sub, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    which = "" if len(subs) == 3 else " of the " + ", ".join(type(s).__name__ for s in subs)
    ctx.notes.append(f"dynamic int8 Linear{which} (torch.ao, engine {torch.backends.quantized.engine})")


def _apply_fine_window(model, ctx):
    from .fine_window import WINDOW_MULTIPLE, use_fine_window

    use_fine_window(model)
    ctx.notes.append(f"fine model on the real frames rounded up to {WINDOW_MULTIPLE} (not a 1024-frame window)")


def _torchao_on_cuda(device: torch.device) -> str | None:
    problem = availability.package_problem("torchao", device) if device.type == "cuda" else None
    return problem and f"needs the package 'torchao', {problem}"


def _apply_int8_weight_only(model, ctx):
    if ctx.device.type == "cpu":  # torchao's CPU route reads int8 weights at ~1 GB/s in a decode step
        from .int8_gemv import quantize_linears

        replaced = sum(quantize_linears(sub) for sub in _transformer_submodels(model))
        ctx.notes.append(f"{replaced} Linear layers int8 weight-only (barkbench.int8_gemv: a dequantizing "
                         f"product-and-sum per decode step, for inductor to fuse)")
        return
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    for sub in _transformer_submodels(model):
        quantize_(sub, Int8WeightOnlyConfig())


def _apply_static(model, ctx):
    from .static_decode import use_static_cache

    use_static_cache(model)
    ctx.notes.append("semantic and coarse decode against a pre-allocated StaticCache (causal mask from the "
                     "cache position)")


def _apply_devloop(model, ctx):
    from .device_decode import use_device_decode

    use_device_decode(model)
    graphed = "one CUDA graph per decode step" if ctx.device.type == "cuda" else "launched eagerly (no CUDA)"
    ctx.notes.append(f"semantic and coarse decode in a device-side loop (static cache, logits processing and "
                     f"sampling on the device, no host sync per step): {graphed}")


def _apply_compile(model, ctx):
    # The fine model runs fixed 1024-frame windows (static shapes) and holds most of the compute:
    # compiled as a full graph. Semantic and coarse decode one token at a time against a growing
    # dynamic KV cache (Bark's attention derives its causal mask from the key length): compiling them
    # buys guard and recompile cost, not speed (measured: slower on CPU), so they stay eager unless
    # the static optimization gives them a fixed-size cache. EnCodec's decoder is tiny.
    # Default inductor mode on every device: max-autotune benchmarks kernel configurations per shape (minutes of
    # compilation per batch size on a GPU, against the job's time limit), and the fine model's per-codebook
    # calls are few and large, so CUDA graphs would buy little.
    from .int8_compile import make_compilable

    if wrapped := make_compilable(model):  # int8: torch.ao's dynamic Linear, one opaque operator in the graph
        ctx.notes.append(f"{wrapped} dynamic int8 Linear layers compiled as opaque operators (the same kernel)")
    model.fine_acoustics.forward = torch.compile(model.fine_acoustics.forward)
    ctx.notes.append("torch.compile (mode=default) of the fine model's forward")
    # With a static cache (static), every decode step has the same shapes: compiled once.
    from .static_decode import StaticCacheDecoding, compile_decode_steps

    if isinstance(model.semantic, StaticCacheDecoding):
        decode_mode = compile_decode_steps(model, ctx.device)
        ctx.notes.append(f"torch.compile (mode={decode_mode}, fullgraph) of the semantic and coarse decode step")


def _apply_openvino(model, ctx):
    # Where compile compiles (the fine model; with static, the decode step), OpenVINO's torch.compile backend.
    from . import openvino_runtime
    from .static_decode import StaticCacheDecoding, compile_decode_steps

    options = openvino_runtime.backend_options()
    model.fine_acoustics.forward = torch.compile(model.fine_acoustics.forward, backend=openvino_runtime.BACKEND,
                                                 options=options)
    ctx.notes.append(f"OpenVINO (torch.compile backend, CPU plugin {options['config']}) runs the fine model's "
                     "forward")
    if isinstance(model.semantic, StaticCacheDecoding):
        compile_decode_steps(model, ctx.device, backend=openvino_runtime.BACKEND, options=options)
        ctx.notes.append("OpenVINO runs the semantic and coarse decode step (static cache)")


def _apply_ort(model, ctx):
    from . import ort_runtime

    files = ort_runtime.use_ort(model, torch.get_num_threads())
    import onnxruntime

    ctx.notes.append(f"ONNX Runtime {onnxruntime.__version__} (CPU execution provider, fp32, "
                     f"{torch.get_num_threads()} intra-op threads) runs the semantic, coarse and fine models' forward, "
                     f"exported with torch.onnx (dynamo, opset {ort_runtime.EXPORT_OPSET}): "
                     + ", ".join(f"{k} {p.parent.name}" for k, p in files.items()))


def _apply_ort_int8(model, ctx):
    from . import ort_int8

    weights = ort_int8.use_ort_int8(model, torch.get_num_threads())
    import onnxruntime

    ctx.notes.append(f"ONNX Runtime {onnxruntime.__version__} (CPU execution provider, {torch.get_num_threads()} "
                     "intra-op threads) runs the semantic and coarse models' forward as int8 graphs (MatMulNBits "
                     f"blocks of {ort_int8.BLOCK}, accuracy level {ort_int8.ACCURACY_LEVEL}, in-place key/value "
                     "buffers): " + ", ".join(f"{k} {v / 1e6:.1f} MB of weights" for k, v in weights.items()))


# Per sub-config: a plain "flash_attention_2" reaches codec_config too, and EncodecModel refuses it at load.
FA2_PER_SUBMODEL = {"semantic_config": "flash_attention_2", "coarse_acoustics_config": "flash_attention_2",
                    "fine_acoustics_config": "flash_attention_2", "codec_config": "eager"}

register(Optimization("eager", "transformers' eager attention, fp32: the baseline", group="attention"))
register(Optimization(
    "sdpa", "Bark attention through torch scaled_dot_product_attention, mask-correct "
    "(successor of BetterTransformer)", group="attention", order=30, apply=_apply_sdpa, call_factor=0.73))
register(Optimization(
    "fa2", "attn_implementation='flash_attention_2'", group="attention", needs_cuda=True,
    needs_packages=("flash_attn",), load_kwargs=lambda d: {"attn_implementation": FA2_PER_SUBMODEL},
    conflicts=("offload",), limit=HALF_PRECISION))  # FA2 runs in fp16/bf16 only: the dtype optimization names the format
register(Optimization(
    "fp16", "float16 weights and activations", group="dtype", needs_cuda=True,
    cpu_reason="has no native float16 matmul on CPU (use bf16)",
    load_kwargs=lambda d: {"dtype": torch.float16}, reference="fp16", limit=HALF_PRECISION))
register(Optimization(
    "bf16", "bfloat16 weights and activations", group="dtype",
    load_kwargs=lambda d: {"dtype": torch.bfloat16}, reference="bf16", limit=HALF_PRECISION,
    pays_off_with=("avx512_bf16", "amx_bf16"), call_factor=0.53,
    pays_off_why="without native bf16 dot products oneDNN converts to fp32 around every matmul: several times "
                 "slower than fp32"))
register(Optimization(
    "offload", "model.enable_cpu_offload(): one sub-model on the accelerator at a time (accelerate hooks)",
    group="placement", needs_cuda=True, cpu_reason="offloads to CPU from an accelerator; CPU is already home",
    places_model=True, order=10, apply=_apply_offload))
register(Optimization(
    "int8", "dynamic int8 quantization of the transformers' Linear layers (torch.ao)", group="quantization",
    order=20, apply=_apply_int8_dynamic, conflicts=("fp16", "bf16", "offload"),
    cuda_reason="has no CUDA kernel (torch.ao's quantized::linear_dynamic runs on CPU only; int8wo is the CUDA path)",
    reference="int8-dynamic", limit=INT8_WEIGHTS, pays_off_with=("avx512_vnni", "avx_vnni", "amx_int8", "avx2"),
    call_factor=0.6, fidelity_extra=0.9,  # its check: the int8 reference simulation and the per-layer check
    pays_off_why="fbgemm/oneDNN int8 GEMMs need at least AVX2; VNNI or AMX make them pay in compute-bound stages"))
register(Optimization(
    "int8wo", "int8 weight-only quantization of the transformers' Linear layers (torchao on CUDA; on a CPU "
    "barkbench.int8_gemv, a GEMV inductor fuses)", group="quantization", order=20, apply=_apply_int8_weight_only,
    needs_on_device=_torchao_on_cuda, conflicts=("offload",), reference="int8-weight-only", limit=INT8_WEIGHTS,
    cpu_conflicts=("bf16", "fp16"), cpu_reason="on a CPU, its GEMV is written for fp32 activations",
    requires=("compile",),  # no estimate priors: it is in no default run
    requires_why="uncompiled, it dequantizes the weights at every matmul: slower than the format it replaces"))
register(Optimization(
    "nf4", "4-bit NF4 weights (bitsandbytes) for the transformers' Linear layers", group="quantization",
    needs_cuda=True, needs_packages=("bitsandbytes",), conflicts=("offload",), reference="nf4", limit=FOUR_BIT,
    load_kwargs=lambda d: {"quantization_config": __import__("transformers").BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
        llm_int8_skip_modules=["codec_model", "lm_head", "lm_heads"])}))
register(Optimization(
    "static", "semantic and coarse models decode against a pre-allocated KV cache (fixed shapes per step; "
    "with compile: the decode step compiled, CUDA graphs on a GPU)", group="cache", order=40,
    apply=_apply_static, requires=("sdpa",), conflicts=("offload",),
    requires_why="the causal mask from the cache position is built in the project's SDPA attention",
    first_call_extra=1.0, fidelity_extra=19.0))  # with compile, the fidelity check compiles each decode length
register(Optimization(
    "devloop", "semantic and coarse models decode in a device-side loop: static KV cache, Bark's logits processing "
    "and sampling on the device, no host sync per step, the step replayed as one CUDA graph on a GPU",
    group="cache", order=40, apply=_apply_devloop, requires=("sdpa",), conflicts=("offload",),
    requires_why="the causal mask from the cache position is built in the project's SDPA attention"))
register(Optimization(
    "legacy", "the 2023 study's stack: transformers 4.45 + optimum 1.23 (envs/legacy-requirements.txt)",
    group="stack", order=0, needs_packages=("optimum",), needs_stack=legacy.stack_reason))
register(Optimization(
    "bt", "optimum's BetterTransformer (the 2023 study): Bark attention through SDPA with attn_mask=None",
    group="attention", order=30, needs_packages=("optimum",), apply=_apply_bt, call_factor=0.7))
register(Optimization(
    "finewin", "fine model on the real frames rounded up to a multiple of 64 instead of a padded 1024-frame "
    "window (approximate: the non-causal fine model no longer sees the padding)", group="fine_window", order=60,
    apply=_apply_fine_window, conflicts=("offload",),
    # its reference is the baseline with the same window: the implementation is judged exactly, and what the
    # shorter window costs is measured on the chain (fine codes and audio from the same coarse tokens)
    reference="fine-window", call_factor=0.47, fidelity_extra=1.5))  # its check also measures what the shorter window costs
register(Optimization(
    "compile", "torch.compile of the sub-models (compilation timed separately)", group="compile",
    order=90, apply=_apply_compile, conflicts=("offload",), needs_on_device=availability.compile_toolchain_problem,
    compiles=True, first_call_extra=5.0, fidelity_extra=4.0))

# OpenVINO: the CPU runtime a user would pick instead of PyTorch (OpenVINO's CPU plugin needs SSE4.2 at least;
# AVX2 / AVX-512 set its kernel speed, VNNI / AMX its int8 speed).
register(Optimization(
    "ov", "OpenVINO runs the sub-models compile would compile (torch.compile backend 'openvino', CPU plugin, "
    "fp32 inference precision)", group="compile", order=90, apply=_apply_openvino,
    conflicts=("offload", "int8", "bf16"),
    cuda_reason="runs on OpenVINO's CPU plugin (the model would leave the GPU)",
    needs_stack=lambda: __import__("barkbench.openvino_runtime").openvino_runtime.unavailable_reason(),
    pays_off_with=("avx2", "avx512f"),
    pays_off_why="OpenVINO's CPU kernels need AVX2 at least to beat oneDNN's fp32"))
# ONNX Runtime: the other CPU runtime a user would pick; installable wherever PyTorch is (a PyPI wheel).
register(Optimization(
    "ort", "ONNX Runtime (CPU execution provider, fp32) runs the three transformers' forward, exported to ONNX; "
    "Bark's generate loops stay in PyTorch", group="compile", order=90, apply=_apply_ort,
    conflicts=("offload", "legacy", "sdpa", "bt", "int8", "bf16", "static", "devloop"),
    cuda_reason="runs on ONNX Runtime's CPU execution provider (the model would leave the GPU)",
    needs_stack=lambda: __import__("barkbench.ort_runtime").ort_runtime.unavailable_reason(),
    # priors: finewin+ort 7.3 s against eager 19.5 s and sdpa+finewin 6.4 (bark-small, 2 cores); the export (~100 s
    # for bark-small's three sub-models) happens in the first process of a run only, then comes from the cache; its
    # fidelity check took 302 s against eager's 20.2 s call (05b8010), 3.5 calls over the check's priors
    call_factor=0.8, first_call_extra=3.0, fidelity_extra=3.4))

register(Optimization(
    "ortint8", "ONNX Runtime runs the semantic and coarse models as int8 graphs (MatMulNBits: int8 weights and "
    "activations in blocks of 128; attention over in-place key/value buffers, GroupQueryAttention); the fine model (fp32, or "
    "torch.ao int8 with int8) and Bark's generate loops (or devloop's) stay in PyTorch", group="compile",
    # applied first: the graphs are built from the fp32 weights, and int8 then quantizes what is left (the fine model)
    order=15, apply=_apply_ort_int8,
    conflicts=("offload", "legacy", "bt", "int8wo", "nf4", "bf16", "fp16", "static"),
    cuda_reason="runs on ONNX Runtime's CPU execution provider (the model would leave the GPU)",
    needs_stack=lambda: __import__("barkbench.ort_runtime").ort_runtime.unavailable_reason(),
    reference="int8-block", limit=INT8_BLOCKS, pays_off_with=("avx512_vnni", "avx_vnni", "amx_int8", "avx2"),
    pays_off_why="MLAS's int8 kernels need at least AVX2",
    # priors: ~0.5 of sdpa+finewin on a 2-core AVX2 CPU (its int8 prefills are slower there, its decode steps faster)
    call_factor=0.5, fidelity_extra=1.0))


@dataclass(frozen=True)
class Variant:
    name: str
    optimizations: tuple[Optimization, ...]

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.optimizations]

    def not_applicable_reason(self, device: torch.device) -> str | None:
        names = {o.name for o in self.optimizations}
        for opt in self.optimizations:
            reason = opt.not_applicable_reason(device)
            if reason:
                return reason
            if device.type == "cpu" and (clash := names & set(opt.cpu_conflicts)):
                return f"not applicable on cpu: {opt.name} with {'+'.join(sorted(clash))} ({opt.cpu_reason})"
        return None

    def load_kwargs(self, device: torch.device) -> dict:
        kwargs = {}
        for opt in self.optimizations:
            if opt.load_kwargs:
                kwargs.update(opt.load_kwargs(device))
        return kwargs

    def pays_off_on(self, cpu_features) -> str | None:
        """None when every optimization can pay off on a CPU with these features; else the reasons."""
        reasons = [r for o in self.optimizations if (r := o.pays_off_on(cpu_features))]
        return "; ".join(reasons) or None

    @property
    def places_model(self) -> bool:
        return any(o.places_model for o in self.optimizations)

    @property
    def compiles(self) -> bool:
        return any(o.compiles for o in self.optimizations)

    def apply(self, model, ctx: Context) -> None:
        for opt in sorted(self.optimizations, key=lambda o: o.order):
            if opt.apply:
                opt.apply(model, ctx)

    @property
    def reference_formats(self) -> list[str]:
        """The number formats the reference simulation applies to the baseline, in the order the variant applies
        them: what loading does (a dtype) first, then what is applied to the loaded model."""
        return [o.reference for o in sorted(self.optimizations, key=lambda o: (o.load_kwargs is None, o.order))
                if o.reference]

    @property
    def limit(self) -> ImplementationLimit:
        """The loosest limit of its optimizations."""
        limits = [o.limit for o in self.optimizations]
        return ImplementationLimit(max(l.model_share for l in limits), max(l.layer_share for l in limits),
                                   "; ".join(dict.fromkeys(l.calibration for l in limits if l is not EXACT))
                                   or EXACT.calibration)


def parse(variant: str) -> Variant:
    """Parse 'offload+sdpa+fp16' into registry entries; refuse unknown names and conflicts early."""
    parts = [p.strip() for p in variant.split("+")]
    if not variant or any(not p for p in parts):
        raise VariantError(f"malformed variant {variant!r}: expected names joined by '+', e.g. sdpa+bf16")
    unknown = [p for p in parts if p not in REGISTRY]
    if unknown:
        raise VariantError(f"unknown optimization {', '.join(map(repr, unknown))} in variant {variant!r}; "
                           f"known: {', '.join(REGISTRY)}")
    if len(set(parts)) != len(parts):
        raise VariantError(f"variant {variant!r} repeats an optimization")
    # One spelling per set of optimizations (`bf16+sdpa` is `sdpa+bf16`): results and tables are keyed by it.
    opts = tuple(sorted((REGISTRY[p] for p in parts), key=_spelling_rank))
    groups: dict[str, str] = {}
    for opt in opts:
        if opt.group and opt.group in groups:
            raise VariantError(f"variant {variant!r} combines {groups[opt.group]} and {opt.name}: "
                               f"both set the {opt.group}")
        if opt.group:
            groups[opt.group] = opt.name
        clash = [c for c in opt.conflicts if c in parts]
        if clash:
            raise VariantError(f"variant {variant!r}: {opt.name} cannot be combined with {', '.join(clash)}")
        missing = [r for r in opt.requires if r not in parts]
        if missing:
            why = f" ({opt.requires_why})" if opt.requires_why else ""
            raise VariantError(f"variant {variant!r}: {opt.name} needs {', '.join(missing)}{why}")
    return Variant("+".join(o.name for o in opts), opts)


# The canonical spelling's order: the software stack, where a model lives, its attention, its weights, its dtype, anything else,
# and compilation last (it compiles what the others made).
SPELLING_ORDER = ("stack", "placement", "attention", "quantization", "dtype", None, "compile")


def _spelling_rank(opt: Optimization) -> tuple[int, int]:
    # within "anything else" (the decode cache, the fine window), the order they are applied in
    return SPELLING_ORDER.index(opt.group if opt.group in SPELLING_ORDER else None), opt.order


def canonical(variant: str) -> str:
    """The one spelling of a variant, e.g. `bf16+sdpa` -> `sdpa+bf16`."""
    return parse(variant).name
