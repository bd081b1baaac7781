"""The optimization registry. A variant is a '+'-joined set of optimizations, e.g. `offload+sdpa+fp16`.

Each optimization says whether it can run here (device, installed packages), what it changes at
load time (`from_pretrained` kwargs), what it does to the loaded model, and the fidelity tolerance
it is held to against eager fp32. Adding an optimization is one `register(...)` call.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import legacy


class VariantError(ValueError):
    """A variant string that names an unknown optimization or conflicting ones."""


@dataclass(frozen=True)
class Tolerance:
    """How far a variant may stray from eager fp32 on the same inputs (see `barkbench.fidelity`): teacher-
    forced KL divergence (nats) and max |Δp| of the baseline's top token, max logit error relative to the
    baseline's largest |logit| (scale-free: random and trained weights differ in logit scale by orders of
    magnitude), and the SNR of the candidate's codec on the same codes.
    Free-running tokens need no bound of their own: they are judged against the measured logit error."""

    logits_max_rel: float
    kl_mean: float
    kl_p99: float
    max_dp_top: float
    min_snr_db: float
    note: str

    @staticmethod
    def loosest(tolerances: list["Tolerance"]) -> "Tolerance":
        return Tolerance(
            max(t.logits_max_rel for t in tolerances),
            max(t.kl_mean for t in tolerances), max(t.kl_p99 for t in tolerances),
            max(t.max_dp_top for t in tolerances), min(t.min_snr_db for t in tolerances),
            "; ".join(dict.fromkeys(t.note for t in tolerances)))


# Tolerances from measured noise floors: `python -m barkbench.noise_floor synthetic:tiny|synthetic:bark-small
# sdpa bf16 int8 nf4-weights compile` (CPU, torch 2.x), worst value over both models and all sub-models, times a margin
# of 4 on logit errors and |Δp| and 4² = 16 on KL (KL grows with the square of a logit error). Measured with
# SYNTHETIC weights: hub weights give sharper distributions, so re-measure there before trusting a verdict.
FLOAT_ROUNDING = Tolerance(
    4e-6, 2e-12, 2e-12, 5e-8, 60.0,
    "fp32 reordering: floor of sdpa vs eager max rel logit err 8.3e-7, KL mean 8.1e-14, p99 1.1e-13, "
    "|Δp| 1.0e-8, x4 (KL x16). torch.compile (inductor, tiny) measured below it (2e-7, KL 1e-15). Codec: no such "
    "variant touches it, 60 dB kept as a plain bound")
HALF = Tolerance(
    0.06, 4e-4, 5e-4, 8e-4, 40.0,
    "half precision: floor of bf16 vs eager max rel logit err 0.0135, KL mean 2.1e-5, p99 2.6e-5, |Δp| "
    "2.0e-4, x4 (KL x16). fp16 keeps 3 more mantissa bits than bf16, so bf16's floor bounds it. Codec SNR "
    "(same codes): bf16 floor 47.2 dB (bark-small, 47.7 tiny) minus 6 dB, rounded down")
INT8 = Tolerance(
    0.35, 0.02, 0.03, 6e-3, 60.0,
    "int8 weights: floor of dynamic int8 vs eager max rel logit err 0.087, KL mean 9.4e-4, p99 1.5e-3, "
    "|Δp| 1.5e-3 (fine at generate's 1024 frames), x4 (KL x16). Codec stays fp32")
FOUR_BIT = Tolerance(
    1.2, 0.25, 0.3, 0.012, 60.0,
    "4-bit weights: floor of NF4-rounded weights (blocks of 64) vs eager max rel logit err 0.30, KL mean "
    "0.013, p99 0.016, |Δp| 2.8e-3, x4 (KL x16). Codec stays fp32")


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
    tolerance: Tolerance = FLOAT_ROUNDING
    cpu_reason: str | None = None  # why it does not run on CPU even though it could import
    cuda_reason: str | None = None  # why it does not run on CUDA (a CPU-only optimization)
    requires_why: str = ""
    needs_stack: Callable[[], str | None] | None = None  # why this interpreter's stack cannot run it

    def not_applicable_reason(self, device: torch.device) -> str | None:
        if self.needs_stack and (reason := self.needs_stack()):
            return reason
        if device.type == "cpu" and self.needs_cuda:
            return f"not applicable on cpu: {self.name} {self.cpu_reason or 'needs a CUDA device'}"
        if device.type == "cuda" and self.cuda_reason:
            return f"not applicable on cuda: {self.name} {self.cuda_reason}"
        for package in self.needs_packages:
            if importlib.util.find_spec(package) is None:
                return f"not applicable here: {self.name} needs the package '{package}', not installed"
        return None


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

    for sub in _transformer_submodels(model):
        quantize_dynamic(sub, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    ctx.notes.append(f"dynamic int8 Linear (torch.ao, engine {torch.backends.quantized.engine})")


def _apply_int8_weight_only(model, ctx):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    for sub in _transformer_submodels(model):
        quantize_(sub, Int8WeightOnlyConfig())


def _apply_static(model, ctx):
    from .static_decode import use_static_cache

    use_static_cache(model)
    ctx.notes.append("semantic and coarse decode against a pre-allocated StaticCache (causal mask from the "
                     "cache position)")


def _apply_compile(model, ctx):
    # The fine model runs fixed 1024-frame windows (static shapes) and holds most of the compute:
    # compiled as a full graph. Semantic and coarse decode one token at a time against a growing
    # dynamic KV cache (Bark's attention derives its causal mask from the key length): compiling them
    # buys guard and recompile cost, not speed (measured: slower on CPU), so they stay eager unless
    # the static optimization gives them a fixed-size cache. EnCodec's decoder is tiny.
    # Default inductor mode on every device: max-autotune benchmarks kernel configurations per shape (minutes of
    # compilation per batch size on a GPU, against the job's time limit), and the fine model's per-codebook
    # calls are few and large, so CUDA graphs would buy little.
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


# Per sub-config: a plain "flash_attention_2" reaches codec_config too, and EncodecModel refuses it at load.
FA2_PER_SUBMODEL = {"semantic_config": "flash_attention_2", "coarse_acoustics_config": "flash_attention_2",
                    "fine_acoustics_config": "flash_attention_2", "codec_config": "eager"}

register(Optimization("eager", "transformers' eager attention, fp32: the baseline", group="attention"))
register(Optimization(
    "sdpa", "Bark attention through torch scaled_dot_product_attention, mask-correct "
    "(successor of BetterTransformer)", group="attention", order=30, apply=_apply_sdpa))
register(Optimization(
    "fa2", "attn_implementation='flash_attention_2'", group="attention", needs_cuda=True,
    needs_packages=("flash_attn",), load_kwargs=lambda d: {"attn_implementation": FA2_PER_SUBMODEL},
    conflicts=("offload",), tolerance=HALF))
register(Optimization(
    "fp16", "float16 weights and activations", group="dtype", needs_cuda=True,
    cpu_reason="has no native float16 matmul on CPU (use bf16)",
    load_kwargs=lambda d: {"dtype": torch.float16}, tolerance=HALF))
register(Optimization(
    "bf16", "bfloat16 weights and activations", group="dtype",
    load_kwargs=lambda d: {"dtype": torch.bfloat16}, tolerance=HALF))
register(Optimization(
    "offload", "model.enable_cpu_offload(): one sub-model on the accelerator at a time (accelerate hooks)",
    group="placement", needs_cuda=True, cpu_reason="offloads to CPU from an accelerator; CPU is already home",
    places_model=True, order=10, apply=_apply_offload))
register(Optimization(
    "int8", "dynamic int8 quantization of the transformers' Linear layers (torch.ao)", group="quantization",
    order=20, apply=_apply_int8_dynamic, conflicts=("fp16", "bf16", "offload", "compile"),
    cuda_reason="has no CUDA kernel (torch.ao's quantized::linear_dynamic runs on CPU only; int8wo is the CUDA path)",
    tolerance=INT8))
register(Optimization(
    "int8wo", "int8 weight-only quantization of the transformers' Linear layers (torchao)",
    group="quantization", order=20, needs_cuda=True, needs_packages=("torchao",), apply=_apply_int8_weight_only,
    conflicts=("offload",), tolerance=INT8, requires=("compile",),
    requires_why="uncompiled, torchao dequantizes the weights at every matmul: slower than the bf16 it replaces"))
register(Optimization(
    "nf4", "4-bit NF4 weights (bitsandbytes) for the transformers' Linear layers", group="quantization",
    needs_cuda=True, needs_packages=("bitsandbytes",), conflicts=("offload",), tolerance=FOUR_BIT,
    load_kwargs=lambda d: {"quantization_config": __import__("transformers").BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
        llm_int8_skip_modules=["codec_model", "lm_head", "lm_heads"])}))
register(Optimization(
    "static", "semantic and coarse models decode against a pre-allocated KV cache (fixed shapes per step; "
    "with compile: the decode step compiled, CUDA graphs on a GPU)", group="cache", order=40,
    apply=_apply_static, requires=("sdpa",), conflicts=("offload",),
    requires_why="the causal mask from the cache position is built in the project's SDPA attention"))
register(Optimization(
    "legacy", "the 2023 study's stack: transformers 4.45 + optimum 1.23 (envs/legacy-requirements.txt)",
    group="stack", order=0, needs_packages=("optimum",), needs_stack=legacy.stack_reason))
register(Optimization(
    "bt", "optimum's BetterTransformer (the 2023 study): Bark attention through SDPA with attn_mask=None",
    group="attention", order=30, needs_packages=("optimum",), apply=_apply_bt))
register(Optimization(
    "compile", "torch.compile of the sub-models (compilation timed separately)", group="compile",
    order=90, apply=_apply_compile, conflicts=("offload",)))

# OpenVINO: the CPU runtime a user would pick instead of PyTorch (OpenVINO's CPU plugin needs SSE4.2 at least;
# AVX2 / AVX-512 set its kernel speed, VNNI / AMX its int8 speed).
register(Optimization(
    "ov", "OpenVINO runs the sub-models compile would compile (torch.compile backend 'openvino', CPU plugin, "
    "fp32 inference precision)", group="compile", order=90, apply=_apply_openvino,
    conflicts=("offload", "int8", "bf16"),
    cuda_reason="runs on OpenVINO's CPU plugin (the model would leave the GPU)",
    needs_stack=lambda: __import__("barkbench.openvino_runtime").openvino_runtime.unavailable_reason()))


@dataclass(frozen=True)
class Variant:
    name: str
    optimizations: tuple[Optimization, ...]

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.optimizations]

    def not_applicable_reason(self, device: torch.device) -> str | None:
        for opt in self.optimizations:
            reason = opt.not_applicable_reason(device)
            if reason:
                return reason
        return None

    def load_kwargs(self, device: torch.device) -> dict:
        kwargs = {}
        for opt in self.optimizations:
            if opt.load_kwargs:
                kwargs.update(opt.load_kwargs(device))
        return kwargs

    @property
    def places_model(self) -> bool:
        return any(o.places_model for o in self.optimizations)

    def apply(self, model, ctx: Context) -> None:
        for opt in sorted(self.optimizations, key=lambda o: o.order):
            if opt.apply:
                opt.apply(model, ctx)

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance.loosest([o.tolerance for o in self.optimizations])


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


def _spelling_rank(opt: Optimization) -> int:
    return SPELLING_ORDER.index(opt.group if opt.group in SPELLING_ORDER else None)


def canonical(variant: str) -> str:
    """The one spelling of a variant, e.g. `bf16+sdpa` -> `sdpa+bf16`."""
    return parse(variant).name
