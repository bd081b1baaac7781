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
    """How far a variant may stray from eager fp32 on the same inputs."""

    logits_max_abs: float
    logits_max_rel: float
    min_token_agreement: float  # share of greedily decoded tokens identical to the baseline's prefix
    min_snr_db: float  # waveform decoded from the same codes
    note: str

    @staticmethod
    def loosest(tolerances: list["Tolerance"]) -> "Tolerance":
        return Tolerance(
            max(t.logits_max_abs for t in tolerances), max(t.logits_max_rel for t in tolerances),
            min(t.min_token_agreement for t in tolerances), min(t.min_snr_db for t in tolerances),
            "; ".join(dict.fromkeys(t.note for t in tolerances)))


FLOAT_ROUNDING = Tolerance(1e-3, 1e-3, 0.95, 60.0, "fp32 reordering only: float rounding")
HALF = Tolerance(0.25, 0.05, 0.5, 20.0, "half precision: 8-11 mantissa bits, greedy paths may diverge late")
QUANTIZED = Tolerance(0.5, 0.15, 0.25, 15.0, "int8/4-bit weights: quantization error, greedy paths may diverge")


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
    load_kwargs: Callable[[torch.device], dict] | None = None
    apply: Callable[[torch.nn.Module, Context], None] | None = None
    places_model: bool = False  # it moves the model to the device itself (offload)
    tolerance: Tolerance = FLOAT_ROUNDING
    cpu_reason: str | None = None  # why it does not run on CPU even though it could import
    needs_stack: Callable[[], str | None] | None = None  # why this interpreter's stack cannot run it

    def not_applicable_reason(self, device: torch.device) -> str | None:
        if self.needs_stack and (reason := self.needs_stack()):
            return reason
        if device.type == "cpu" and self.needs_cuda:
            return f"not applicable on cpu: {self.name} {self.cpu_reason or 'needs a CUDA device'}"
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


def _apply_compile(model, ctx):
    # The fine model runs fixed 1024-frame windows (static shapes) and holds most of the compute:
    # compiled as a full graph. Semantic and coarse decode one token at a time against a growing
    # dynamic KV cache (Bark's attention derives its causal mask from the key length, so a static
    # cache is not an option without forking transformers): compiling them buys guard and recompile
    # cost, not speed (measured: slower on CPU), so they stay eager. EnCodec's decoder is tiny.
    mode = "max-autotune-no-cudagraphs" if ctx.device.type == "cuda" else None
    model.fine_acoustics.forward = torch.compile(model.fine_acoustics.forward, mode=mode)
    ctx.notes.append(f"torch.compile (mode={mode or 'default'}) of the fine model's forward")


register(Optimization("eager", "transformers' eager attention, fp32: the baseline", group="attention"))
register(Optimization(
    "sdpa", "Bark attention through torch scaled_dot_product_attention, mask-correct "
    "(successor of BetterTransformer)", group="attention", order=30, apply=_apply_sdpa))
register(Optimization(
    "fa2", "attn_implementation='flash_attention_2'", group="attention", needs_cuda=True,
    needs_packages=("flash_attn",), load_kwargs=lambda d: {"attn_implementation": "flash_attention_2"},
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
    cpu_reason=None, tolerance=QUANTIZED))
register(Optimization(
    "int8wo", "int8 weight-only quantization of the transformers' Linear layers (torchao)",
    group="quantization", order=20, needs_cuda=True, needs_packages=("torchao",), apply=_apply_int8_weight_only,
    conflicts=("offload",), tolerance=QUANTIZED))
register(Optimization(
    "nf4", "4-bit NF4 weights (bitsandbytes) for the transformers' Linear layers", group="quantization",
    needs_cuda=True, needs_packages=("bitsandbytes",), conflicts=("offload",), tolerance=QUANTIZED,
    load_kwargs=lambda d: {"quantization_config": __import__("transformers").BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
        llm_int8_skip_modules=["codec_model", "lm_head", "lm_heads"])}))
register(Optimization(
    "legacy", "the 2023 study's stack: transformers 4.45 + optimum 1.23 (envs/legacy-requirements.txt)",
    group="stack", order=0, needs_packages=("optimum",), needs_stack=legacy.stack_reason))
register(Optimization(
    "bt", "optimum's BetterTransformer (the 2023 study): Bark attention through SDPA with attn_mask=None",
    group="attention", order=30, needs_packages=("optimum",), apply=_apply_bt))
register(Optimization(
    "compile", "torch.compile of the sub-models (compilation timed separately)", group="compile",
    order=90, apply=_apply_compile, conflicts=("offload",)))


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
    opts = tuple(REGISTRY[p] for p in parts)
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
    return Variant(variant, opts)
