"""Static-cache decoding (static, static+compile): token-exact against eager fp32 on synthetic:tiny,
greedy and sampled, at batch size 1 and on a padded batch."""
from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

from barkbench import models
from barkbench.static_decode import StaticCacheDecoding, coarse_cache_length
from conftest import DECODE_TOKENS, PROMPTS, SHORT_WINDOW, TINY, load_short_window, stage_tokens

CPU = torch.device("cpu")
TOKENS, WINDOW = DECODE_TOKENS, SHORT_WINDOW


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """eager (the baseline), sdpa+static and sdpa+static+compile, loaded once for the module."""
    return {name: load_short_window(name) for name in ("eager", "sdpa+static", "sdpa+static+compile")}


@pytest.fixture(scope="module")
def eager_tokens(loaded):
    """The baseline's stage tokens per case, generated once for both candidates."""
    done = {}

    def tokens(prompts, do_sample):
        key = (tuple(prompts), do_sample)
        if key not in done:
            done[key] = stage_tokens(loaded["eager"], prompts, do_sample)
        return done[key]

    return tokens


def _assert_static_cache_used(model, batch_size: int):
    for sub in (model.semantic, model.coarse_acoustics):
        assert isinstance(sub, StaticCacheDecoding)
        cache = sub._decode_cache[1]
        assert isinstance(cache, StaticCache)
        layer = cache.layers[0]
        assert layer.keys.shape[0] == batch_size and layer.keys.shape[2] == layer.max_cache_len


CASES = [pytest.param([PROMPTS[0]], False, id="greedy-bs1"),
         pytest.param(PROMPTS + ["Hi"], False, id="greedy-padded-bs3"),
         pytest.param(PROMPTS + ["Hi"], True, id="sampled-padded-bs3")]


@pytest.mark.parametrize("candidate", ["sdpa+static", "sdpa+static+compile"])
@pytest.mark.parametrize("prompts, do_sample", CASES)
def test_static_decoding_gives_the_tokens_of_eager(loaded, eager_tokens, candidate, prompts, do_sample):
    reference = eager_tokens(prompts, do_sample)
    tokens = stage_tokens(loaded[candidate], prompts, do_sample)
    _assert_static_cache_used(loaded[candidate].model, len(prompts))
    assert reference["semantic"].shape == (len(prompts), TOKENS)
    assert reference["coarse"].shape[-1] > WINDOW  # more than one sliding window
    for stage in ("semantic", "coarse", "fine"):
        assert torch.equal(tokens[stage], reference[stage]), stage


def test_compile_compiles_the_decode_steps_only_with_static(loaded):
    for name in ("sdpa+static", "sdpa+static+compile"):
        stage_tokens(loaded[name], [PROMPTS[0]], False)
    compiled = loaded["sdpa+static+compile"].model
    for sub in (compiled.semantic, compiled.coarse_acoustics):
        assert sub.decode_compile is not None and hasattr(sub, "_compiled_call")  # used by the calls above
    plain = loaded["sdpa+static"].model
    assert plain.semantic.decode_compile is None and not hasattr(plain.semantic, "_compiled_call")


def test_the_cache_is_kept_across_calls_of_the_same_shape(loaded):
    model = loaded["sdpa+static"].model
    stage_tokens(loaded["sdpa+static"], [PROMPTS[0]], False)
    first = model.coarse_acoustics._decode_cache[1]
    stage_tokens(loaded["sdpa+static"], [PROMPTS[1]], False)
    assert model.coarse_acoustics._decode_cache[1] is first


def test_coarse_cache_holds_the_longest_window():
    from transformers.models.bark.generation_configuration_bark import (BarkCoarseGenerationConfig,
                                                                         BarkSemanticGenerationConfig)

    sem = BarkSemanticGenerationConfig(**models.SEMANTIC_GENERATION)
    coarse = BarkCoarseGenerationConfig(**models.COARSE_GENERATION)
    # few semantic tokens: prompt (256) + infer token + every coarse token (10 semantic -> 31 coarse)
    assert coarse_cache_length(10, sem, coarse) == 256 + 1 + 31
    # many: prompt + infer token + full history (630) + one window (60)
    assert coarse_cache_length(768, sem, coarse) == 256 + 1 + 630 + 60


def test_static_needs_the_sdpa_attention(tiny_checkpoint):
    from barkbench.static_decode import use_static_cache

    model = models.load(models.resolve(TINY)).model
    with pytest.raises(RuntimeError, match="sdpa"):
        use_static_cache(model)
