"""int8 weight-only Linear layers for a CPU, written for torch.compile to fuse (the `int8wo` optimization on CPU).

Semantic and coarse decode are memory-bound at batch size 1: each step reads every weight once for one row of
activations. With int8 weights the floor is a quarter of fp32's, but only if the kernel reads the int8 bytes at the
machine's bandwidth. The library paths measured on a 2-core AVX-512 machine (bark-small's 49 decode GEMVs per step,
93 MB of int8 weights, one compiled graph; `python -m barkbench.int8_gemv`) did not:

- torch.ao's dynamic int8 Linear (fbgemm): ~9 GB/s; it quantizes the activations and packs them at every call;
- `aten._weight_int8pack_mm` with fp32 activations (torchao's CPU route, and what inductor turns
  `mm(x, w.to(float)) * scale` into): ~1 GB/s;
- a product-and-sum over the dequantized row, `(x[:, None, :] * w.to(float)).sum(-1) * scale`, which inductor
  generates as one vectorized reduction per output row, parallel over rows: ~14 GB/s, near the machine's read
  bandwidth.

So a single row (a decode step) takes the product-and-sum over the int8 weights; several rows (a prefill, the fine
model's frames, a batch) a GEMM against a dequantized copy of the same weights (kept beside them: dequantizing at
every call cost more than the GEMM), where the compute, not the weight bytes, sets the time. Both compute the
format's numbers; the copy costs memory (int8 plus fp32: 1.25x the fp32 weights), which the run's peak shows. The format
is torchao's `Int8WeightOnlyConfig` (`references.int8_weight_only`): weights per output channel, symmetric
(scale = max|w| / 127.5), activations unquantized. Uncompiled, the product-and-sum materializes the dequantized
weights at every step: `int8wo` requires `compile`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .references import per_channel_scale


class Int8WeightOnlyLinear(torch.nn.Module):
    """A Linear with int8 weights (per output channel, symmetric) and activations in their own dtype."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = per_channel_scale(weight)
        # times the inverse scale, as `references.fake_quant_symmetric` (and torch's quantize kernels) round
        self.register_buffer("weight_int8", torch.clamp(torch.round(weight * (1.0 / scale)), -128, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scale", scale.squeeze(1).to(linear.weight.dtype))
        self.register_buffer("weight_dequantized", (self.weight_int8 * scale).to(linear.weight.dtype),
                             persistent=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1:  # a decode step: read each int8 weight once (memory-bound)
            # Inductor inlines a pointwise producer (layer norm, GELU) into the reduction's inner loop, where it is
            # recomputed for every output row; it realizes the input of `as_strided` instead: computed once.
            rows = torch.as_strided(rows, rows.shape, rows.stride())
            y = (rows[:, None, :] * self.weight_int8.to(x.dtype)).sum(-1) * self.scale
        else:  # compute-bound: one GEMM against the dequantized weights
            y = F.linear(rows, self.weight_dequantized)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(module: torch.nn.Module) -> int:
    """Replace every torch.nn.Linear under `module` by an Int8WeightOnlyLinear; returns how many."""
    replaced = 0
    for name, child in list(module.named_modules()):
        if type(child) is torch.nn.Linear:
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, Int8WeightOnlyLinear(child))
            replaced += 1
    return replaced
