"""OpenVINO as the CPU runtime of Bark's sub-models, through OpenVINO's `torch.compile` backend.

The sub-models stay PyTorch modules and `BarkModel.generate` keeps its own loops; what runs a compiled
sub-model's forward is an OpenVINO CPU plugin model converted from the traced graph (ops OpenVINO cannot
convert stay in PyTorch: the backend partitions the graph). The fine model is compiled as `compile` does
(fixed 1024-frame windows, most of the compute); with a static KV cache, the semantic and coarse decode
step too (through transformers' compile config, once per sub-model and batch size).

Precision and threads are set explicitly: the CPU plugin's default inference precision is bf16 on CPUs
with native bf16 (AVX-512 BF16, AMX), which would make the variant a half-precision one on some machines
and fp32 on others, and its default thread count need not match the job's.

No int8 variant on this route: under torch 2.13 the captured graph takes the parameters as inputs (nn.Module
inlining), so the OpenVINO model the backend builds has no constant weights, and NNCF's `compress_weights` on it
finds nothing to compress (measured: empty bitwidth statistics for every graph of synthetic:tiny's sub-models, and weights
as Parameters of the converted model of a plain Linear stack). int8
weights through NNCF need the sub-models converted to IR (`ov.convert_model`) with a decode loop outside
`generate`, as OpenVINO's Bark notebook does.
"""
from __future__ import annotations

import functools

import torch

BACKEND = "openvino"


def unavailable_reason() -> str | None:
    """Why OpenVINO cannot run here (None: it can): under an instruction-set ceiling (checked each time: the ceiling
    is this process's environment), or the package, its torch.compile backend and its CPU plugin, checked once by
    compiling and running one op."""
    from .isa import uncappable_reason

    return uncappable_reason("OpenVINO's CPU plugin") or _runtime_problem()


@functools.cache
def _runtime_problem() -> str | None:
    try:
        import numpy as np
        import openvino as ov
        import openvino.opset13 as ops
        import openvino.torch  # noqa: F401  (registers the torch.compile backend)

        x = ops.parameter([2], ov.Type.f32)
        compiled = ov.Core().compile_model(ov.Model([ops.relu(x)], [x]), "CPU")
        out = compiled([np.array([-1.0, 2.0], dtype=np.float32)])[0]
        if out.tolist() != [0.0, 2.0]:
            return f"not applicable here: OpenVINO's CPU plugin computed relu([-1, 2]) = {out.tolist()}"
        if BACKEND not in torch.compiler.list_backends():
            return "not applicable here: OpenVINO's torch.compile backend is not registered with this torch"
    except Exception as exc:  # ImportError, a CPU plugin that cannot load, an ABI mismatch with torch
        return f"not applicable here: OpenVINO is not usable ({type(exc).__name__}: {exc})"[:300]
    return None


def plugin_config(threads: int) -> dict:
    """The CPU plugin's settings: fp32 arithmetic whatever the CPU, and the job's thread count."""
    return {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads)}


def backend_options() -> dict:
    # aot_autograd: without it, the fine model of bark-small came out bit-identical to eager and 2-3x slower, i.e.
    # not run by OpenVINO at all (the backend falls back silently); with it, max |logit error| 3.8e-6.
    return {"device": "CPU", "aot_autograd": True, "config": plugin_config(torch.get_num_threads())}
