"""The 2023 study's stack: transformers 4.x with optimum's BetterTransformer.

The legacy rows run this package from source with the interpreter of a virtual environment built from
`envs/legacy-requirements.txt` (transformers 4.45, optimum 1.23). Everything that differs between that
stack and today's lives here, so the run path stays one: the `legacy` optimization only says which stack
a run needs, `bt` is optimum's conversion as the study applied it, and two calls are spelled the 4.x way.
"""
from __future__ import annotations

import importlib.metadata

LEGACY_MAJOR = 4  # transformers major version of the 2023 stack


def transformers_major() -> int:
    return int(importlib.metadata.version("transformers").split(".")[0])


def is_legacy_stack() -> bool:
    return transformers_major() <= LEGACY_MAJOR


def stack_reason() -> str | None:
    """Why a `legacy` run cannot run in this interpreter (None: it can)."""
    if is_legacy_stack():
        return None
    return (f"not applicable here: legacy runs on the 2023 stack (transformers {LEGACY_MAJOR}.x + optimum, "
            f"envs/legacy-requirements.txt), this interpreter has transformers "
            f"{importlib.metadata.version('transformers')}")


def from_pretrained_kwargs(kwargs: dict) -> dict:
    """transformers 4.x names the load dtype `torch_dtype` (5.x: `dtype`; 4.x passes `dtype` on to the
    config and loads fp32 without a word)."""
    if is_legacy_stack() and "dtype" in kwargs:
        kwargs = dict(kwargs)
        kwargs["torch_dtype"] = kwargs.pop("dtype")
    return kwargs


def enable_cpu_offload(model, index: int) -> None:
    """BarkModel.enable_cpu_offload: `gpu_id` in transformers 4.x, `accelerator_id` in 5.x."""
    if is_legacy_stack():
        model.enable_cpu_offload(gpu_id=index)
    else:
        model.enable_cpu_offload(accelerator_id=index)


def to_bettertransformer(model) -> int:
    """Convert `model` in place with optimum's BetterTransformer, as the 2023 study did
    (`BetterTransformer.transform(model, keep_original_model=False)`); returns the layers converted.
    optimum's Bark layer calls SDPA with `attn_mask=None`: it ignores the attention mask."""
    from optimum.bettertransformer import BetterTransformer
    from optimum.bettertransformer.models.decoder_models import BarkAttentionLayerBetterTransformer

    converted = BetterTransformer.transform(model, keep_original_model=False)
    if converted is not model:  # the registry applies optimizations in place
        raise RuntimeError("BetterTransformer.transform returned a copy, not the model converted in place")
    layers = sum(isinstance(m, BarkAttentionLayerBetterTransformer) for m in model.modules())
    if not layers:
        raise RuntimeError("BetterTransformer converted no Bark attention layer")
    return layers
