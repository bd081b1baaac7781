"""Static-cache decoding for Bark's semantic and coarse models, optionally with a compiled decode step.

Both models generate through transformers' own loop (`GenerationMixin.generate`, Bark's logits
processors, the coarse model's sliding window, the seeded sampler), asked for
`cache_implementation="static"`: keys and values go to a pre-allocated `StaticCache`, the attention
mask arrives as a 4D mask over all cache slots, and the project's SDPA attention builds the causal
mask from the cache position (`attention.BarkSdpaAttention`). Every decode step then has the same
shapes, which is what lets `torch.compile` compile it once: transformers compiles the decode step
(not the prefill) when a compile config is given (`GenerationMixin.get_compiled_call`).

The sub-models' class is swapped in place (as `attention.use_sdpa` does) to a subclass that adds those
generate arguments and keeps one cache per sub-model across calls: a cache at the same addresses is what
CUDA graphs replay against, and a coarse call runs several windows.
"""
from __future__ import annotations

import math

import torch
from transformers import CompileConfig
from transformers.models.bark.modeling_bark import BarkCoarseModel, BarkSemanticModel

from .attention import BarkSdpaAttention


class StaticCacheDecoding:
    """Mixin for a Bark causal sub-model: static KV cache, compiled decode step when `decode_compile` is set."""

    decode_compile: CompileConfig | None = None

    def _static_generate_kwargs(self, kwargs: dict) -> dict:
        if "cache_implementation" in kwargs or "cache" in kwargs:
            return kwargs
        extra = {"cache_implementation": "static"}
        if self.decode_compile is None:
            extra["disable_compile"] = True  # transformers would otherwise compile a static-cache decode on CUDA
        else:
            extra["compile_config"] = self.decode_compile
        return {**extra, **kwargs}

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size,
                              model_kwargs):
        # One cache per sub-model, reset rather than re-allocated while its size fits: the compiled step
        # (and its CUDA graph) keeps reading the same buffers.
        key = (cache_implementation, batch_size, max_cache_len, prefill_chunk_size)
        held = getattr(self, "_decode_cache", None)
        if held is not None and held[0] == key:
            held[1].reset()
            return held[1]
        cache = super()._prepare_static_cache(cache_implementation, batch_size, max_cache_len,
                                              prefill_chunk_size, model_kwargs)
        self._decode_cache = (key, cache)
        return cache


class StaticBarkSemanticModel(StaticCacheDecoding, BarkSemanticModel):
    def generate(self, input_ids, semantic_generation_config=None, history_prompt=None, attention_mask=None,
                 **kwargs):
        return super().generate(input_ids, semantic_generation_config, history_prompt, attention_mask,
                                **self._static_generate_kwargs(kwargs))


class StaticBarkCoarseModel(StaticCacheDecoding, BarkCoarseModel):
    def generate(self, semantic_output, semantic_generation_config=None, coarse_generation_config=None,
                 codebook_size=1024, history_prompt=None, return_output_lengths=None, **kwargs):
        kwargs = self._static_generate_kwargs(kwargs)
        if coarse_generation_config is not None and semantic_generation_config is not None:
            # Each window is its own generate call with its own prompt length; one cache size for all of
            # them (prompt + history + window, bounded by what this call can generate) avoids a new cache
            # and a new compiled graph per window.
            kwargs.setdefault("max_cache_len", coarse_cache_length(
                semantic_output.shape[-1], semantic_generation_config, coarse_generation_config))
        return super().generate(semantic_output, semantic_generation_config, coarse_generation_config,
                                codebook_size, history_prompt, return_output_lengths, **kwargs)


def coarse_cache_length(semantic_tokens: int, semantic_config, coarse_config) -> int:
    """Cache slots the longest coarse window needs: the semantic prompt, the infer token, and at most
    the coarse history plus one window, never more coarse tokens than the semantic tokens give."""
    ratio = coarse_config.coarse_rate_hz / semantic_config.semantic_rate_hz * coarse_config.n_coarse_codebooks
    coarse_tokens = math.ceil(semantic_tokens * ratio)
    return (coarse_config.max_coarse_input_length + 1
            + min(coarse_config.max_coarse_history + coarse_config.sliding_window_len, coarse_tokens))


STATIC_CLASSES = {BarkSemanticModel: StaticBarkSemanticModel, BarkCoarseModel: StaticBarkCoarseModel}


def switch_decoders(model, classes: dict, what: str) -> list[torch.nn.Module]:
    """Swap the class of the semantic and coarse sub-models of a BarkModel for `classes[type(sub)]` (decoding
    against a pre-allocated cache, whose causal mask follows the cache position: the sdpa attention's);
    returns them. `what` names the decoding in errors."""
    switched = []
    for sub in (model.semantic, model.coarse_acoustics):
        target = classes.get(type(sub))
        if target is None:
            raise RuntimeError(f"cannot switch {type(sub).__name__} to {what}")
        if not any(isinstance(m, BarkSdpaAttention) for m in sub.modules()):
            raise RuntimeError(f"{what} needs the sdpa attention (its causal mask follows the cache position)")
        sub.__class__ = target
        switched.append(sub)
    return switched


def use_static_cache(model) -> list[torch.nn.Module]:
    """Switch the semantic and coarse sub-models of a BarkModel to static-cache decoding; returns them."""
    return switch_decoders(model, STATIC_CLASSES, "static-cache decoding")


def compile_decode_steps(model, device: torch.device, backend: str = "inductor", options: dict | None = None) -> str:
    """Compile the decode step of the (static-cache) semantic and coarse models; returns the mode used.
    Another backend than inductor (OpenVINO's) gets its own `options` and no inductor mode."""
    # CUDA graphs need static shapes and static buffer addresses: both hold for the decode step here.
    mode = None if backend != "inductor" else "reduce-overhead" if device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=True, dynamic=False, mode=mode, backend=backend, options=options)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told so
    for sub in (model.semantic, model.coarse_acoustics):
        if not isinstance(sub, StaticCacheDecoding):
            raise RuntimeError("the decode step compiles only with static-cache decoding")
        sub.decode_compile = config
    return mode
