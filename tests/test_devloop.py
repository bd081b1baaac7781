"""The device-side decode loop (devloop): token-exact against `BarkModel.generate` of eager fp32, greedy and
seeded sampling, at batch size 1 and on a padded batch, in fixed-length and natural (EOS) mode; its step
has fixed shapes and never reads a tensor value on the host; it runs through the registry and the runner."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from transformers import StaticCache, set_seed
from transformers.models.bark.generation_configuration_bark import BarkSemanticGenerationConfig

from barkbench import models, runner, variants
from barkbench.attention import use_sdpa
from barkbench.device_decode import (DecodeState, DeviceDecoding, LogitsProgram, ProgramSpec, decode_step,
                                     model_forward_of, use_device_decode)
from barkbench.protocol import Protocol
from conftest import DECODE_TOKENS, PROMPTS, SHORT_WINDOW, TINY, TORCH_THREADS, load_short_window, stage_tokens

CPU = torch.device("cpu")
TOKENS, WINDOW = DECODE_TOKENS, SHORT_WINDOW
_load, _stage_tokens = load_short_window, stage_tokens


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return {name: _load(name) for name in ("eager", "sdpa+devloop")}


CASES = [pytest.param([PROMPTS[0]], False, id="greedy-bs1"),
         pytest.param([PROMPTS[0]], True, id="sampled-bs1"),
         pytest.param(PROMPTS + ["Hi"], False, id="greedy-padded-bs3"),
         pytest.param(PROMPTS + ["Hi"], True, id="sampled-padded-bs3")]


@pytest.mark.parametrize("prompts, do_sample", CASES)
def test_devloop_gives_the_tokens_of_eager_generate(loaded, prompts, do_sample):
    reference = _stage_tokens(loaded["eager"], prompts, do_sample)
    tokens = _stage_tokens(loaded["sdpa+devloop"], prompts, do_sample)
    assert reference["semantic"].shape == (len(prompts), TOKENS)
    assert reference["coarse"].shape[-1] > WINDOW  # more than one sliding window
    for sub in (loaded["sdpa+devloop"].model.semantic, loaded["sdpa+devloop"].model.coarse_acoustics):
        _, decoder = sub._device_decoder  # the loop ran, on a static cache of this batch
        assert isinstance(decoder.cache, StaticCache) and decoder.state.out.shape[0] == len(prompts)
    for stage in ("semantic", "coarse", "fine", "audio"):
        assert tokens[stage].shape == reference[stage].shape, stage
        assert torch.equal(tokens[stage], reference[stage]), stage


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_devloop_over_int8_gives_the_tokens_of_int8_generate(tiny_checkpoint, do_sample):
    # The loop changes who steps the model, not what a step computes: torch.ao's int8 Linear layers quantize the
    # same activations whether transformers' loop or the device-side one calls them.
    reference = _stage_tokens(_load("sdpa+int8"), [PROMPTS[0]], do_sample)
    over_int8 = _load("sdpa+int8+devloop")
    tokens = _stage_tokens(over_int8, [PROMPTS[0]], do_sample)
    assert type(over_int8.model.semantic.layers[0].mlp.in_proj).__module__.startswith("torch.ao")
    assert hasattr(over_int8.model.semantic, "_device_decoder")  # the loop ran
    for stage in ("semantic", "coarse", "fine", "audio"):
        assert torch.equal(tokens[stage], reference[stage]), stage


@pytest.mark.skipif(__import__("barkbench.ort_runtime").ort_runtime.unavailable_reason() is not None,
                    reason="needs ONNX Runtime")
@pytest.mark.parametrize("prompts, do_sample", [CASES[1], CASES[2]])
def test_devloop_over_ortint8_gives_the_tokens_of_ortint8_generate(tiny_checkpoint, prompts, do_sample, monkeypatch):
    # ONNX Runtime's int8 graphs keep the keys and values in their own buffers: the loop hands them a cache that only
    # counts positions (emptied per call, as generate starts a new one), and a step computes what generate's does.
    # A sampled step's draws are made by another thread while the graph runs: the same draws, in the same order.
    import threading

    from transformers import DynamicCache

    from barkbench.fidelity import StepRecorder

    reference = _stage_tokens(_load("sdpa+ortint8"), prompts, do_sample)
    over_ort = _load("sdpa+devloop+ortint8")
    drawn_by = []
    noise = LogitsProgram.noise
    monkeypatch.setattr(LogitsProgram, "noise", lambda self, *a: (drawn_by.append(threading.current_thread().name),
                                                                   noise(self, *a))[1])
    # every step through the sub-model's forward, so that a wrapper of it (the fidelity check's recorder) sees it
    with StepRecorder(over_ort.model.semantic) as semantic, StepRecorder(over_ort.model.coarse_acoustics) as coarse:
        tokens = _stage_tokens(over_ort, prompts, do_sample)
    decode_steps = len(semantic.calls) - 1 + len(coarse.calls) - -(-reference["coarse"].shape[-1] // WINDOW)
    assert len(drawn_by) == (decode_steps if do_sample else 0)
    assert all(name.startswith("barkbench-draws") for name in drawn_by)
    assert reference["coarse"].shape[-1] > WINDOW  # more than one window: a new sequence in the buffers per window
    assert [logits.shape[1] for _, _, logits in semantic.calls][1:] == [1] * (TOKENS - 1)  # a prefill, then steps
    assert len(coarse.calls) == reference["coarse"].shape[-1]  # one call per coarse token, prefills included
    for sub in (over_ort.model.semantic, over_ort.model.coarse_acoustics):
        _, decoder = sub._device_decoder  # the loop ran
        assert isinstance(decoder.cache, DynamicCache) and decoder.state.out.shape[0] == len(prompts)
    for stage in ("semantic", "coarse", "fine", "audio"):
        assert torch.equal(tokens[stage], reference[stage]), stage


@pytest.mark.skipif(__import__("barkbench.ort_runtime").ort_runtime.unavailable_reason() is not None,
                    reason="needs ONNX Runtime")
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_the_ortint8_steps_skip_the_module_forward(tiny_checkpoint, do_sample, monkeypatch):
    # Unwrapped, the loop's steps go straight to the session (the sub-model's `step_forward`): the module forward runs
    # the prompts only (one per call, one per coarse window), and the tokens are generate's.
    from barkbench import ort_int8

    reference = _stage_tokens(_load("sdpa+ortint8"), [PROMPTS[0]], do_sample)
    over_ort = _load("sdpa+devloop+ortint8")
    runs = []
    run = ort_int8.Decoder.run
    monkeypatch.setattr(ort_int8.Decoder, "run", lambda self, hidden, *a: (runs.append(hidden.shape[1]),
                                                                         run(self, hidden, *a))[1])
    tokens = _stage_tokens(over_ort, [PROMPTS[0]], do_sample)
    windows = -(-reference["coarse"].shape[-1] // WINDOW)
    assert windows > 1 and len(runs) == 1 + windows and min(runs) > 1  # prompts only
    for stage in ("semantic", "coarse", "fine", "audio"):
        assert torch.equal(tokens[stage], reference[stage]), stage
    # the cache counts the prompt's positions only: a module forward cannot continue the sequence unnoticed
    semantic = over_ort.model.semantic
    _, decoder = semantic._device_decoder
    with pytest.raises(RuntimeError, match="buffers hold"), torch.inference_mode():
        semantic(input_ids=torch.zeros(1, 1, dtype=torch.long), cache=decoder.cache, use_cache=True)


class WarmedUpStep:
    """CPU stand-in for CudaGraphStep: the same warm-up steps before the first real call, then the step itself."""

    def __init__(self, step):
        for _ in range(3):
            step()
        self.step, self.replays = step, 0

    def __call__(self):
        self.step()
        self.replays += 1


def test_the_capture_path_resets_what_its_warm_up_ran(tiny_checkpoint, monkeypatch):
    """Capturing runs real steps first (cache writes, positions, tokens): the loop must start clean after."""
    from barkbench import device_decode

    monkeypatch.setattr(device_decode, "CudaGraphStep", WarmedUpStep)
    monkeypatch.setattr(DeviceDecoding, "_graphed", lambda self: True)
    captured = _load("sdpa+devloop")
    prompts = PROMPTS + ["Hi"]
    reference = _stage_tokens(_load("eager"), prompts, False)
    for _ in range(2):  # the second call reuses the decoders (and their "graphs")
        tokens = _stage_tokens(captured, prompts, False)
        for stage in ("semantic", "coarse"):
            assert torch.equal(tokens[stage], reference[stage]), stage
    for sub in (captured.model.semantic, captured.model.coarse_acoustics):
        assert isinstance(sub._device_decoder[1].step, WarmedUpStep) and sub._device_decoder[1].step.replays > 0


def _semantic(loaded_model, prompts, do_sample, **kwargs):
    model = loaded_model.model
    config = BarkSemanticGenerationConfig(**model.generation_config.semantic_config)
    set_seed(0)
    with torch.inference_mode():
        return model.semantic.generate(**loaded_model.processor(prompts, return_tensors="pt"),
                                       semantic_generation_config=config, do_sample=do_sample, **kwargs)


# Bark's EOS prioritizer ends a sequence once p(EOS) > min_eos_p; on the tiny synthetic weights p(EOS) sits
# near 1e-4, so these thresholds end the rows at different steps (1.2e-4) or all at the second step (1e-4).
@pytest.mark.parametrize("min_eos_p", [1.2e-4, 1.0e-4])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_natural_length_stops_and_pads_as_generate(loaded, min_eos_p, do_sample):
    prompts = PROMPTS + ["Hi"]
    reference = _semantic(loaded["eager"], prompts, do_sample, max_new_tokens=80, min_eos_p=min_eos_p)
    ended = (reference == 10_000).any(dim=1)  # the semantic EOS, also its pad token
    assert ended.any()  # the case exercises EOS
    if min_eos_p == 1.0e-4:
        assert reference.shape[1] < 80 and ended.all()  # stopped early: the loop must cut its extra steps
    tokens = _semantic(loaded["sdpa+devloop"], prompts, do_sample, max_new_tokens=80, min_eos_p=min_eos_p)
    assert tokens.shape == reference.shape and torch.equal(tokens, reference)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_eos_masked_for_the_first_steps_ends_as_generate(loaded, do_sample):
    # min_new_tokens masks EOS for the first steps only; with min_eos_p = 1e-4 every greedy row takes EOS at the first
    # step it may: exactly where the mask ends
    reference = _semantic(loaded["eager"], PROMPTS, do_sample, max_new_tokens=40, min_eos_p=1.0e-4, min_new_tokens=6)
    assert not (reference[:, :6] == 10_000).any()  # (generate returns the new tokens only)
    if not do_sample:
        assert (reference[:, 6] == 10_000).all()
    tokens = _semantic(loaded["sdpa+devloop"], PROMPTS, do_sample, max_new_tokens=40, min_eos_p=1.0e-4,
                       min_new_tokens=6)
    assert tokens.shape == reference.shape and torch.equal(tokens, reference)


def test_an_unsupported_logits_processor_is_refused(loaded):
    with pytest.raises(NotImplementedError, match="RepetitionPenaltyLogitsProcessor"):
        _semantic(loaded["sdpa+devloop"], [PROMPTS[0]], False, max_new_tokens=4, repetition_penalty=1.3)


def _meta_decoder(semantic_model, batch_size=2, cache_length=300, out_length=8):
    """A decode step whose tensors all live on the meta device: shapes only, no values."""
    use_sdpa(semantic_model)  # the attention the loop runs with
    model = semantic_model.to("meta")
    cache = StaticCache(config=model.config, max_cache_len=cache_length)
    spec = ProgramSpec(vocab_size=model.config.output_vocab_size, suppressed=(5, 7), alternating=(10_000, 1024, 0),
                       eos_token_id=10_000, pad_token_id=10_000, eos_masked_steps=3, min_eos_p=0.2,
                       temperature=0.8, top_k=50, renormalize=True, do_sample=True)
    program = LogitsProgram(spec, torch.device("meta"))
    state = DecodeState.empty(batch_size, out_length, torch.device("meta"))
    return model, cache, program, state


def test_the_decode_step_has_fixed_shapes_and_no_host_read(tiny_checkpoint):
    """The stand-in for CUDA-graph capture on CPU: on the meta device a tensor has no value, so any host read
    (.item(), bool(), Python branching on a tensor) raises; the buffers keep their shapes step after step."""
    model, cache, program, state = _meta_decoder(models.load(models.resolve(TINY)).model.semantic)
    forward = model_forward_of(model, cache)
    shapes = {k: v.shape for k, v in vars(state).items()}
    prompt = torch.zeros(2, 17, dtype=torch.long, device="meta")
    model(input_ids=prompt, cache=cache, position_ids=torch.arange(17, device="meta")[None], use_cache=True)
    for _ in range(3):
        decode_step(forward, program, state)
        assert {k: v.shape for k, v in vars(state).items()} == shapes
    assert cache.layers[0].keys.shape[2] == 300  # the pre-allocated cache, not a growing one


def test_the_meta_stand_in_catches_a_host_read(tiny_checkpoint):
    model, cache, program, state = _meta_decoder(models.load(models.resolve(TINY)).model.semantic)
    forward = model_forward_of(model, cache)

    def forward_with_a_host_read(tokens, positions):
        if positions.max() > 1000:  # Python branching on a tensor value: a host sync on a GPU
            raise AssertionError("unreachable")
        return forward(tokens, positions)

    with pytest.raises(RuntimeError, match="meta"):
        decode_step(forward_with_a_host_read, program, state)


def test_the_sampler_draws_as_multinomial(tiny_checkpoint):
    """Same seed, same draws as torch.multinomial (what generate samples with), and on another RNG stream
    the same distribution (chi-square against the probabilities)."""
    torch.manual_seed(1)
    scores = torch.randn(64, 300)
    program = LogitsProgram(ProgramSpec(vocab_size=300, do_sample=True), CPU)
    torch.manual_seed(7)
    expected = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    torch.manual_seed(7)
    assert torch.equal(program.choose(scores), expected)
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    many = torch.log(probs).expand(40_000, -1).contiguous()
    generator_state = torch.get_rng_state()
    torch.manual_seed(123)
    counts = np.bincount(program.choose(many).numpy(), minlength=5)
    torch.set_rng_state(generator_state)
    assert scipy_stats.chisquare(counts, probs.numpy() * counts.sum()).pvalue > 1e-4


def test_devloop_needs_sdpa_and_excludes_static():
    with pytest.raises(variants.VariantError, match="needs sdpa"):
        variants.parse("devloop")
    with pytest.raises(variants.VariantError, match="static and devloop|devloop and static"):
        variants.parse("sdpa+static+devloop")
    assert variants.parse("devloop+sdpa").name == "sdpa+devloop"


def test_devloop_refuses_a_model_without_sdpa(tiny_checkpoint):
    with pytest.raises(RuntimeError, match="sdpa"):
        use_device_decode(models.load(models.resolve(TINY)).model)


def test_a_devloop_run_through_the_runner(tiny_checkpoint, tmp_path):
    proto = Protocol(warmup=1, min_iterations=1, max_iterations=2, budget_s=1e6, batch_size=2, max_new_tokens=8,
                     length_mode="fixed")
    out = tmp_path / "results" / "sdpa+devloop" / "bs2.json"
    result = runner.run(runner.RunRequest(TINY, "sdpa+devloop", proto, device="cpu", threads=TORCH_THREADS), out)
    assert result.status == "ok", result.reason
    assert result.variant["optimizations"] == ["sdpa", "devloop"]
    assert any("device-side loop" in note for note in result.variant["notes"])
    assert result.iterations.semantic_tokens == [8] * 2  # fixed length: max_new_tokens every call
    assert out.exists() and out.with_suffix(".wav").exists()


def _semantic_and_coarse(loaded_model, prompts, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy semantic tokens and the coarse tokens made from them: the two stages the loop replaces."""
    from transformers.models.bark.generation_configuration_bark import BarkCoarseGenerationConfig

    model = loaded_model.model
    semantic_config = BarkSemanticGenerationConfig(**model.generation_config.semantic_config)
    coarse_config = BarkCoarseGenerationConfig(**model.generation_config.coarse_acoustics_config)
    inputs = loaded_model.processor(prompts, return_tensors="pt")
    with torch.inference_mode():
        semantic = model.semantic.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                           semantic_generation_config=semantic_config, do_sample=False,
                                           max_new_tokens=tokens, min_new_tokens=tokens)
        coarse = model.coarse_acoustics.generate(semantic.clone(), semantic_generation_config=semantic_config,
                                                 coarse_generation_config=coarse_config,
                                                 codebook_size=model.generation_config.codebook_size, do_sample=False)
    return semantic, coarse


@pytest.mark.slow
def test_devloop_gives_the_tokens_of_eager_generate_on_bark_small():
    """bark-small's width and depth (synthetic weights): greedy, bs 1 and a padded batch of 2."""
    eager, devloop = _load("eager", "synthetic:bark-small"), _load("sdpa+devloop", "synthetic:bark-small")
    for prompts in ([PROMPTS[0]], PROMPTS):
        reference = _semantic_and_coarse(eager, prompts, tokens=10)
        tokens = _semantic_and_coarse(devloop, prompts, tokens=10)
        assert reference[1].shape[-1] > WINDOW  # more than one sliding window
        for stage, ref, got in zip(("semantic", "coarse"), reference, tokens):
            assert got.shape == ref.shape and torch.equal(got, ref), stage


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_devloop_replays_a_cuda_graph_and_matches_sdpa_on_cuda(tiny_checkpoint):
    cuda = torch.device("cuda")
    reference = _stage_tokens(_load("sdpa", device=cuda), PROMPTS, False, device=cuda)
    devloop = _load("sdpa+devloop", device=cuda)
    tokens = _stage_tokens(devloop, PROMPTS, False, device=cuda)
    for sub in (devloop.model.semantic, devloop.model.coarse_acoustics):
        assert isinstance(sub, DeviceDecoding)
        assert sub._device_decoder[1].step.replays > 0  # the step ran as a CUDA graph
    for stage in ("semantic", "coarse"):
        assert torch.equal(tokens[stage], reference[stage]), stage


def test_eos_masked_for_the_whole_call_is_a_suppressed_token(loaded, monkeypatch):
    """Fixed-length mode masks EOS at every step: the program suppresses it and drops the prioritizer (it can never
    fire on p(EOS) = 0) instead of masking it by step number; natural length keeps both. The tokens stay generate's
    (test_devloop_gives_the_tokens_of_eager_generate runs fixed length; the natural-length test above, the rest)."""
    specs = []
    from_generate = ProgramSpec.from_generate
    monkeypatch.setattr(ProgramSpec, "from_generate",
                        staticmethod(lambda *a, **k: specs.append(from_generate(*a, **k)) or specs[-1]))
    _stage_tokens(loaded["sdpa+devloop"], [PROMPTS[0]], True)  # fixed length, as the benchmark protocol
    fixed, steps = specs[0]
    assert fixed.eos_token_id == 10_000 and fixed.eos_token_id in fixed.suppressed and fixed.min_eos_p is None
    assert fixed.eos_masked_steps >= steps  # still known, for the loop's stopping checks
    assert LogitsProgram(fixed, CPU).eos_masked_steps == 0
    specs.clear()
    _semantic(loaded["sdpa+devloop"], [PROMPTS[0]], False, max_new_tokens=8, min_new_tokens=4, min_eos_p=0.2)
    natural, steps = specs[0]
    assert natural.eos_token_id not in natural.suppressed and natural.min_eos_p == 0.2
    assert 0 < natural.eos_masked_steps < steps and LogitsProgram(natural, CPU).eos_masked_steps > 0
