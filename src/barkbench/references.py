"""Reference simulations of number formats: what a lossy optimization SHOULD compute, written as plain eager
PyTorch applied to a copy of the baseline model. The fidelity check compares a variant with the reference of its
formats (is the implementation right?) and reports the reference's distance to the baseline (what the format
costs). An optimization names its format in the registry (`Optimization.reference`); a new format is one
function here, added to `FORMATS`.

- `bf16`, `fp16`: weights and activations cast (every sub-model, the codec too: the variants load in that dtype).
- `int8-dynamic`: torch.ao dynamic quantization of the transformers' Linear layers as the kernel computes it:
  weights per tensor, symmetric (MinMaxObserver, scale = max|w| / 127.5, values in [-128, 127]); activations
  per tensor and per call, affine over [min(x, 0), max(x, 0)] on 0..127 (`linear_dynamic(..., reduce_range=True)`),
  its parameters from the kernel's own `_choose_qparams_per_tensor` and rounded after one fused multiply-add, as
  fbgemm's quantize does (checked layer by layer on synthetic:tiny and synthetic:bark-small, seeds 0 and 1: the
  x86 engine's outputs equal the simulation's to float rounding); products accumulated exactly (int32), bias in fp32.
  It replaces the Linear layers still there: after `int8-block` (applied first, as its variant is), the fine model's.
- `int8-weight-only`: torchao's Int8WeightOnlyConfig (on a CPU, `barkbench.int8_gemv`): weights per output channel,
  symmetric (scale = max|w| / 127.5 per row), activations unquantized.
- `int8-block`: ONNX Runtime's MatMulNBits int8 (`barkbench.ort_int8`) on the semantic and coarse models' Linear layers:
  weights in blocks of 128 along the input (a shorter input is one block), each block's scale its largest-magnitude
  value over -128, its values times the inverse scale plus the zero point 128, rounded half up (ONNX Runtime's
  quantizer, in float32), in [-128, 127]; activations per row and block, scale max|x| / 127, rounded half to even (accuracy level
  4's int8 dot products); products summed in fp32, bias added after (checked against the kernel layer by layer in
  tests/test_ort_int8.py; on an AVX2 CPU the kernel decides a few exact activation ties the other way, which its
  limit, `variants.INT8_BLOCKS`, allows for).
- `nf4`: bitsandbytes 4-bit NF4 weights (blocks of 64 with an absmax scale each, the NF4 code book) for the
  transformers' Linear layers except the lm heads, computed in float16 (`bnb_4bit_compute_dtype`).
- `fine-window`: the fine model's generate on the real frames rounded up to 64 (`barkbench.fine_window`); it
  changes no arithmetic, so teacher-forced measures do not see it: its cost is the chain's (fine codes, audio).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

# bitsandbytes' NF4 code book (quantiles of a unit normal, scaled to [-1, 1])
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def transformer_linears(model, skip=()) -> list[tuple[str, torch.nn.Linear]]:
    """(qualified name, module) of each Linear of the three transformers, minus names ending in one of `skip`."""
    out = []
    for prefix, sub in (("semantic", model.semantic), ("coarse_acoustics", model.coarse_acoustics),
                        ("fine_acoustics", model.fine_acoustics)):
        for name, module in sub.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(name.split(".")[0] == s for s in skip):
                out.append((f"{prefix}.{name}", module))
    return out


def fake_quant_symmetric(weight: torch.Tensor, scale: torch.Tensor, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    # times the inverse scale, as torch's quantize kernels compute it (x / scale rounds some ties the other way)
    return torch.clamp(torch.round(weight * (1.0 / scale)), qmin, qmax) * scale


def per_tensor_scale(weight: torch.Tensor) -> torch.Tensor:
    """MinMaxObserver(qint8, per_tensor_symmetric): max|w| over the range's half width (255 / 2)."""
    return (weight.detach().abs().amax() / 127.5).clamp_min(torch.finfo(torch.float32).eps)


def per_channel_scale(weight: torch.Tensor) -> torch.Tensor:
    return (weight.detach().abs().amax(1, keepdim=True) / 127.5).clamp_min(torch.finfo(torch.float32).eps)


def fake_quant_activation(x: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Dynamic per-tensor affine quantization of `x` (quint8 on 0..qmax; 127: fbgemm/x86's reduce_range), with the
    quantization parameters chosen as the dynamic Linear chooses them (`torch._choose_qparams_per_tensor`: its
    zero point is nudged in double precision, which a float32 re-derivation misses by one step for some inputs)."""
    scale, zero = torch._choose_qparams_per_tensor(x.detach().float().contiguous(), qmax == 127)
    # zero + x * (1 / scale) in one fused multiply-add (one rounding to float32, as fbgemm's vectorized quantize
    # computes it), then rounded to the nearest integer: two float32 roundings decide some near-ties otherwise
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    t = (x.double() * inv.double() + float(zero)).float()
    return (torch.clamp(torch.round(t), 0, qmax) - zero).to(x.dtype) * scale


class FakeQuantLinear(torch.nn.Module):
    """A Linear computed on fake-quantized weights (precomputed) and, optionally, fake-quantized activations."""

    def __init__(self, linear: torch.nn.Linear, weight: torch.Tensor,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = linear.bias
        self.activation, self.compute_dtype = activation, compute_dtype

    def forward(self, x):
        if self.activation is not None:
            x = self.activation(x)
        if self.compute_dtype is None:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype), bias).to(x.dtype)


def replace_linears(model, make: Callable[[str, torch.nn.Linear], torch.nn.Module], skip=()) -> int:
    """Replace each transformer Linear (see `transformer_linears`) by `make(name, linear)`; returns how many."""
    linears = transformer_linears(model, skip)
    for qualified, linear in linears:
        parent_name, _, attr = qualified.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, make(qualified, linear))
    return len(linears)


def nf4_round(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """`weight` rounded to NF4 in blocks of `block` values with an absmax scale each."""
    flat = weight.detach().float().reshape(-1, block)
    scale = flat.abs().amax(1, keepdim=True).clamp_min(1e-12)
    codes = (flat / scale).unsqueeze(-1).sub(NF4).abs().argmin(-1)
    return (NF4[codes] * scale).reshape(weight.shape).to(weight.dtype)


def bf16(model) -> None:
    model.to(torch.bfloat16)


def fp16(model) -> None:
    model.to(torch.float16)


def int8_dynamic(model) -> None:
    replace_linears(model, lambda name, lin: FakeQuantLinear(
        lin, fake_quant_symmetric(lin.weight.float(), per_tensor_scale(lin.weight.float())), fake_quant_activation))


def int8_weight_only(model) -> None:
    replace_linears(model, lambda name, lin: FakeQuantLinear(
        lin, fake_quant_symmetric(lin.weight, per_channel_scale(lin.weight)).to(lin.weight.dtype), None))


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """`x` (..., K) as (..., blocks, block), zero-padded to whole blocks; and K."""
    k = x.shape[-1]
    pad = -k % block
    return F.pad(x, (0, pad)).reshape(*x.shape[:-1], (k + pad) // block, block), k


def int8_block_weight(weight: torch.Tensor, block: int = 128) -> torch.Tensor:
    w, k = _blocks(weight.detach().float(), block)
    peak = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))  # the signed value of largest magnitude
    scale = peak / -128.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    # times the inverse scale, plus the zero point, then half up, each step in float32 (as the quantizer's C++)
    q = torch.clamp(torch.floor(w * (1.0 / safe) + 128.0 + 0.5), 0, 255) - 128.0
    return (torch.where(scale == 0, torch.zeros_like(w), q * scale)).reshape(*weight.shape[:-1], -1)[..., :k]


def int8_block_activation(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    b, k = _blocks(x.float(), block)
    scale = b.abs().amax(-1, keepdim=True) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(b / safe) * scale).reshape(*x.shape[:-1], -1)[..., :k].to(x.dtype)


INT8_BLOCK_MODELS = ("semantic", "coarse_acoustics")  # the sub-models barkbench.ort_int8 runs


def int8_block(model) -> None:
    for prefix in INT8_BLOCK_MODELS:
        sub = getattr(model, prefix)
        for name, lin in [(n, m) for n, m in sub.named_modules() if isinstance(m, torch.nn.Linear)]:
            parent, _, attr = name.rpartition(".")
            setattr(sub.get_submodule(parent) if parent else sub, attr,
                    FakeQuantLinear(lin, int8_block_weight(lin.weight), int8_block_activation))


NF4_SKIP = ("lm_head", "lm_heads")  # the variant's llm_int8_skip_modules


def nf4(model) -> None:
    replace_linears(model, lambda name, lin: FakeQuantLinear(
        lin, nf4_round(lin.weight) if lin.weight.numel() % 64 == 0 else lin.weight, None, torch.float16),
        skip=NF4_SKIP)


def fine_window(model) -> None:
    from .fine_window import use_fine_window

    use_fine_window(model)


FORMATS: dict[str, Callable] = {"bf16": bf16, "fp16": fp16, "int8-dynamic": int8_dynamic,
                                "int8-weight-only": int8_weight_only, "int8-block": int8_block, "nf4": nf4,
                                "fine-window": fine_window}


def simulate(baseline, formats) -> torch.nn.Module:
    """A copy of `baseline` with each format's simulation applied in order (the baseline itself when none)."""
    if not formats:
        return baseline
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise KeyError(f"no reference simulation for format(s) {unknown}; known: {', '.join(FORMATS)}")
    model = copy.deepcopy(baseline)
    for name in formats:
        FORMATS[name](model)
    return model
