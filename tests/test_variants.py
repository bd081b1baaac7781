"""The variant registry and the SDPA attention: parsing, conflicts, applicability, and SDPA == eager."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from barkbench import attention, models, runner, variants
from barkbench.records import RunResult
from barkbench.protocol import Protocol
from conftest import TINY, TORCH_THREADS

CPU = torch.device("cpu")
ATOL = 1e-5


# --- parsing -------------------------------------------------------------------------------------

def test_parse_joins_with_plus():
    v = variants.parse("sdpa+bf16")
    assert v.name == "sdpa+bf16"
    assert v.names == ["sdpa", "bf16"]
    assert all(isinstance(o, variants.Optimization) for o in v.optimizations)
    assert variants.parse(" sdpa + int8 ").names == ["sdpa", "int8"]
    assert variants.parse("eager").names == ["eager"]


def test_parse_unknown_names_it():
    with pytest.raises(variants.VariantError) as err:
        variants.parse("sdpa+turbo")
    assert str(err.value).startswith("unknown optimization 'turbo' in variant 'sdpa+turbo'")
    assert isinstance(err.value, ValueError)  # the CLI maps ValueError to exit code 2


@pytest.mark.parametrize("text", ["", "+", "sdpa+", "+sdpa", "sdpa++bf16"])
def test_parse_malformed(text):
    with pytest.raises(variants.VariantError, match="malformed"):
        variants.parse(text)


@pytest.mark.parametrize("text,words", [
    ("fp16+bf16", ("fp16", "bf16", "dtype")),
    ("bf16+fp16", ("fp16", "bf16", "dtype")),
    ("sdpa+eager", ("sdpa", "eager", "attention")),
    ("int8+bf16", ("int8", "bf16")),
    ("bf16+int8", ("int8", "bf16")),  # declared on int8 only: caught whatever the order
    ("int8+int8wo", ("int8", "int8wo", "quantization")),
    ("offload+compile", ("offload", "compile")),
    ("sdpa+sdpa", ("repeats",)),
    ("sdpa+int8wo+bf16", ("int8wo needs compile", "dequantizes")),
    ("static", ("static", "needs", "sdpa")),
    ("bf16+static", ("static", "needs", "sdpa")),
    ("offload+sdpa+static", ("static", "offload")),
])
def test_parse_refuses_conflicts(text, words):
    with pytest.raises(variants.VariantError) as err:
        variants.parse(text)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("text", ["sdpa+bf16", "offload+sdpa+fp16", "sdpa+int8", "sdpa+compile", "fa2+fp16",
                                  "sdpa+static", "sdpa+static+compile", "sdpa+bf16+static+compile",
                                  "sdpa+int8+static"])
def test_parse_accepts_compatible(text):
    assert variants.parse(text).names == text.split("+")


@pytest.mark.parametrize("text,spelled", [
    ("bf16+sdpa", "sdpa+bf16"), ("compile+bf16+sdpa", "sdpa+bf16+compile"), ("fp16+sdpa+offload", "offload+sdpa+fp16"),
    ("compile+bf16+int8wo+sdpa", "sdpa+int8wo+bf16+compile"), ("sdpa+bf16", "sdpa+bf16"),
    ("finewin+static+int8+sdpa+compile", "sdpa+int8+static+finewin+compile"),
    ("sdpa+int8+static+finewin+compile", "sdpa+int8+static+finewin+compile"),
])
def test_one_spelling_per_set_of_optimizations(text, spelled):
    assert variants.parse(text).name == variants.canonical(text) == spelled


def test_fa2_leaves_the_codec_on_eager(tiny_checkpoint):
    """EncodecModel refuses flash_attention_2 at load: fa2 reaches the three transformers only."""
    from transformers import BarkConfig

    config = BarkConfig.from_pretrained(tiny_checkpoint, **variants.parse("fa2+fp16").load_kwargs(CPU))
    assert config.codec_config._attn_implementation == "eager"
    for name in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config"):
        assert getattr(config, name)._attn_implementation == "flash_attention_2"


def test_limit_is_the_loosest_of_the_parts_and_the_reference_composes_their_formats():
    sdpa = variants.parse("sdpa")
    assert sdpa.limit == variants.EXACT and sdpa.reference_formats == []
    half = variants.parse("sdpa+bf16")
    assert half.reference_formats == ["bf16"]
    assert (half.limit.model_share, half.limit.layer_share) == (variants.HALF_PRECISION.model_share,
                                                                variants.HALF_PRECISION.layer_share)
    q = variants.parse("bf16+int8wo+compile")  # half precision and int8 weights: the looser share of each
    assert q.reference_formats == ["bf16", "int8-weight-only"]  # loaded in bf16, then quantized
    assert q.limit.model_share == max(variants.HALF_PRECISION.model_share, variants.INT8_WEIGHTS.model_share)
    assert variants.INT8_WEIGHTS.calibration in q.limit.calibration


def test_load_kwargs_and_placement():
    assert variants.parse("sdpa+bf16").load_kwargs(CPU) == {"dtype": torch.bfloat16}
    assert variants.parse("eager").load_kwargs(CPU) == {}
    assert variants.parse("offload+sdpa").places_model
    assert not variants.parse("sdpa+int8").places_model


def test_apply_order_follows_order_not_spelling():
    calls = []
    a = variants.Optimization("late", "", order=90, apply=lambda m, c: calls.append("late"))
    b = variants.Optimization("early", "", order=10, apply=lambda m, c: calls.append("early"))
    variants.Variant("late+early", (a, b)).apply(None, variants.Context(device=CPU))
    assert calls == ["early", "late"]


def test_int8_is_cpu_only():
    reason = variants.parse("sdpa+int8").not_applicable_reason(torch.device("cuda"))
    assert reason.startswith("not applicable on cuda: int8 has no CUDA kernel")
    assert variants.parse("sdpa+int8").not_applicable_reason(CPU) is None


def test_not_applicable_reasons():
    fp16 = variants.REGISTRY["fp16"].not_applicable_reason(CPU)
    assert fp16.startswith("not applicable on cpu") and "fp16" in fp16
    assert variants.REGISTRY["offload"].not_applicable_reason(CPU).startswith("not applicable on cpu")
    assert variants.REGISTRY["sdpa"].not_applicable_reason(CPU) is None
    missing = variants.Optimization("ghost", "", needs_packages=("barkbench_no_such_package_xyz",))
    reason = missing.not_applicable_reason(CPU)
    assert reason.startswith("not applicable here") and "barkbench_no_such_package_xyz" in reason
    # a variant is not applicable as soon as one of its parts is not
    assert variants.parse("sdpa+fp16").not_applicable_reason(CPU) == fp16
    assert variants.parse("sdpa+bf16").not_applicable_reason(CPU) is None


# --- every registry entry through the runner -------------------------------------------------------

def _registry_params():
    for name in sorted(variants.REGISTRY):
        marks = ()
        if variants.REGISTRY[name].compiles:
            marks = (pytest.mark.slow, pytest.mark.skipif(os.environ.get("BARKBENCH_SLOW") != "1",
                                                          reason="torch.compile is slow; set BARKBENCH_SLOW=1"))
        yield pytest.param(name, marks=marks, id=name)


def test_registry_has_the_study_optimizations():
    assert {"eager", "sdpa", "fa2", "fp16", "bf16", "offload", "int8", "int8wo", "nf4", "compile"} <= set(
        variants.REGISTRY)


@pytest.mark.parametrize("name", list(_registry_params()))
def test_every_optimization_runs_or_is_not_applicable_on_cpu(name, tiny_checkpoint, tmp_path):
    protocol = Protocol(warmup=1, min_iterations=1, max_iterations=1, batch_size=1, max_new_tokens=8, do_sample=False)
    variant = variants.canonical("+".join([name, *variants.REGISTRY[name].requires]))
    out = tmp_path / variant / "bs1.json"
    result = runner.run(runner.RunRequest(TINY, variant, protocol, device="cpu", threads=TORCH_THREADS), out)
    RunResult.from_dict(result.to_dict())
    assert json.loads(out.read_text()) == json.loads(json.dumps(result.to_dict()))
    expected_reason = variants.parse(variant).not_applicable_reason(CPU)
    if expected_reason is None:
        assert result.status == "ok", result.reason
        assert result.variant["optimizations"] == variants.parse(variant).names
        assert result.iterations.semantic_tokens == [8]
        assert out.with_suffix(".wav").is_file()
    else:
        assert result.status == "not_applicable"
        assert result.reason == expected_reason
        assert "not applicable on cpu" in result.reason or "not applicable here" in result.reason
        assert result.iterations is None and result.summary is None and result.audio is None
        assert result.model["id"] == TINY and result.model["weights"] == "synthetic"
        assert not out.with_suffix(".wav").exists()
    if name in ("eager", "sdpa", "bf16", "int8"):  # the ones that must run on any CPU
        assert result.status == "ok"


def test_bf16_and_int8_change_what_is_loaded(tiny_checkpoint):
    src = models.resolve(TINY)
    bf16 = models.load(src, **variants.parse("bf16").load_kwargs(CPU)).model
    assert bf16.semantic.lm_head.weight.dtype == torch.bfloat16
    fp32 = models.load(src).model
    fp32_bytes = models.weights_bytes(fp32)
    assert models.weights_bytes(bf16) < 0.6 * fp32_bytes
    ctx = variants.Context(device=CPU)
    variants.parse("int8").apply(fp32, ctx)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    for sub in (fp32.semantic, fp32.coarse_acoustics, fp32.fine_acoustics):
        assert isinstance(sub.layers[0].attn.att_proj, DynamicInt8Linear)
    assert isinstance(fp32.semantic.lm_head, DynamicInt8Linear)
    assert not any(isinstance(m, DynamicInt8Linear) for m in fp32.codec_model.modules())  # EnCodec stays fp32
    assert any("int8" in note for note in ctx.notes)


# --- SDPA == eager ---------------------------------------------------------------------------------

@pytest.fixture
def tiny_model(tiny_checkpoint):
    return models.load(models.resolve(TINY))


def _sub_model_logits(model):
    g = torch.Generator().manual_seed(0)
    sem_ids = torch.randint(0, 10_000, (2, 40), generator=g)
    sem_mask = torch.ones_like(sem_ids)
    sem_mask[1, :10] = 0  # left padding
    coarse_ids = torch.randint(10_000, 12_048, (2, 48), generator=g)
    fine_codes = torch.randint(0, 1024, (2, 128, 8), generator=g)
    with torch.inference_mode():
        out = {
            "semantic": model.semantic(input_ids=sem_ids, attention_mask=sem_mask).logits,
            "semantic_unmasked": model.semantic(input_ids=sem_ids).logits,
            "coarse": model.coarse_acoustics(input_ids=coarse_ids).logits,
            "fine": model.fine_acoustics(2, fine_codes).logits,
        }
        # incremental decoding against a KV cache: several new positions, then one
        prefix = model.semantic(input_ids=sem_ids[:, :30], attention_mask=sem_mask[:, :30], use_cache=True)
        out["cached_block"] = _step(model.semantic, prefix, input_ids=sem_ids[:, 30:34], attention_mask=sem_mask[:, :34])
        # a fresh prefix: the cache is updated in place by the step above
        prefix = model.semantic(input_ids=sem_ids[:, :30], attention_mask=sem_mask[:, :30], use_cache=True)
        out["cached_masked_step"] = _step(model.semantic, prefix, input_ids=sem_ids[:, 30:31],
                                          attention_mask=sem_mask[:, :31])
        prefix = model.coarse_acoustics(input_ids=coarse_ids[:, :40], use_cache=True)
        out["cached_step"] = _step(model.coarse_acoustics, prefix, input_ids=coarse_ids[:, 40:41])
    return out


def _step(sub_model, prefix, **inputs):
    """A forward against `prefix`'s KV cache: `cache` since transformers 5.2x, `past_key_values` before."""
    if hasattr(prefix, "cache"):
        return sub_model(cache=prefix.cache, **inputs).logits
    return sub_model(past_key_values=prefix.past_key_values, **inputs).logits


def test_use_sdpa_switches_every_attention_and_keeps_weights(tiny_model):
    model = tiny_model.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert attention.use_sdpa(model) == 3 * 2  # three transformers x two layers
    kinds = {type(m) for m in model.modules() if isinstance(m, attention.BarkSelfAttention)}
    assert kinds == {attention.BarkSdpaAttention}
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(RuntimeError, match="no eager Bark attention"):
        attention.use_sdpa(model)


def test_sdpa_logits_equal_eager(tiny_model, monkeypatch):
    model = tiny_model.model
    eager = _sub_model_logits(model)
    # the padding mask matters: a variant that ignored it would not match eager
    assert (eager["semantic"][1, 10:] - eager["semantic_unmasked"][1, 10:]).abs().max() > 1e-2
    assert torch.allclose(eager["semantic"][0], eager["semantic_unmasked"][0])

    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting_sdpa)
    attention.use_sdpa(model)
    sdpa = _sub_model_logits(model)
    assert len(calls) > 0 and any(calls) and not all(calls)  # really went through SDPA, masked and not
    for name in eager:
        assert eager[name].shape == sdpa[name].shape, name
        diff = (eager[name] - sdpa[name]).abs().max().item()
        assert diff <= ATOL, f"{name}: max abs diff {diff:.3g}"


def test_sdpa_greedy_generate_gives_identical_audio(tiny_model, tiny_checkpoint):
    from transformers import set_seed

    model, processor = tiny_model.model, tiny_model.processor
    inputs = processor(["Let's try generating speech, with Bark", "Wow, batching is so great!"],
                       return_tensors="pt")
    kwargs = {"do_sample": False, "semantic_max_new_tokens": 8, "semantic_min_new_tokens": 8,
              "fine_temperature": None, "return_output_lengths": True}

    def generate():
        set_seed(0)
        with torch.inference_mode():
            return model.generate(**inputs, **kwargs)

    eager_audio, eager_lengths = generate()
    attention.use_sdpa(model)
    sdpa_audio, sdpa_lengths = generate()
    assert eager_audio.shape[0] == 2 and eager_audio.shape[-1] > 0
    assert torch.isfinite(eager_audio).all() and eager_audio.abs().max() > 0
    assert list(eager_lengths) == list(sdpa_lengths)
    assert torch.equal(eager_audio, sdpa_audio)
