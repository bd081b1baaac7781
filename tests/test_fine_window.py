"""The fine stage on the real frames (finewin): window length, shape, the frames and codebooks it keeps."""
from __future__ import annotations

import pytest
import torch
from transformers import set_seed
from transformers.models.bark.generation_configuration_bark import (
    BarkCoarseGenerationConfig, BarkFineGenerationConfig, BarkSemanticGenerationConfig)

from barkbench import fine_window, models, variants
from barkbench.trackers import Clock, StageTracker
from conftest import TINY, TORCH_THREADS, load_variant

CPU = torch.device("cpu")


@pytest.mark.parametrize("frames,window", [(1, 64), (48, 64), (64, 64), (65, 128), (1000, 1024), (1023, 1024),
                                           (1024, 1024), (3000, 1024)])
def test_window_is_the_frames_rounded_up(frames, window):
    assert fine_window.window_frames(frames, 1024) == window
    assert fine_window.window_frames(frames, 1024, multiple=None) == 1024


def test_window_refuses_no_frames():
    with pytest.raises(ValueError, match="at least 1"):
        fine_window.window_frames(0, 1024)


def _fine_generate(model, coarse):
    gc = model.generation_config
    set_seed(0)
    calls = []
    inner = model.fine_acoustics.forward

    def forward(codebook, input_ids, *args, **kwargs):
        calls.append((codebook, tuple(input_ids.shape)))
        return inner(codebook, input_ids, *args, **kwargs)

    model.fine_acoustics.forward = forward
    try:
        with torch.inference_mode():
            out = model.fine_acoustics.generate(
                coarse, semantic_generation_config=BarkSemanticGenerationConfig(**gc.semantic_config),
                coarse_generation_config=BarkCoarseGenerationConfig(**gc.coarse_acoustics_config),
                fine_generation_config=BarkFineGenerationConfig(**gc.fine_acoustics_config),
                codebook_size=gc.codebook_size, temperature=0.4)
    finally:
        del model.fine_acoustics.forward
    return out, calls


def _load(name):
    return load_variant(name).model


@pytest.mark.parametrize("frames", [48, 64, 130])
def test_fine_window_keeps_the_frames_and_the_coarse_codebooks(tiny_checkpoint, frames):
    eager, windowed = _load("eager"), _load("finewin")
    assert type(windowed.fine_acoustics) is fine_window.WindowedBarkFineModel
    gc = eager.generation_config
    n_coarse = gc.coarse_acoustics_config["n_coarse_codebooks"]
    semantic_vocab = gc.semantic_config["semantic_vocab_size"]
    torch.manual_seed(frames)
    # coarse tokens as the coarse model emits them: codebooks interleaved, offset by the semantic vocabulary
    coarse_codes = torch.randint(0, gc.codebook_size, (2, frames, n_coarse))
    offsets = torch.arange(n_coarse) * gc.codebook_size
    coarse = (coarse_codes + offsets + semantic_vocab).reshape(2, frames * n_coarse)

    ref, ref_calls = _fine_generate(eager, coarse)
    out, calls = _fine_generate(windowed, coarse)
    assert out.shape == ref.shape == (2, gc.fine_acoustics_config["n_fine_codebooks"], frames)
    assert torch.equal(out[:, :n_coarse], coarse_codes.transpose(1, 2).to(out.dtype))
    assert torch.equal(ref[:, :n_coarse], out[:, :n_coarse])
    assert int(out.min()) >= 0 and int(out.max()) < gc.codebook_size  # sampled codes, never the pad id
    # one pass per predicted codebook, over the rounded-up window rather than 1024 frames
    window = fine_window.window_frames(frames, 1024)
    assert [c for c, _ in calls] == [c for c, _ in ref_calls] == list(range(n_coarse, out.shape[1]))
    assert {shape for _, shape in calls} == {(2, window, out.shape[1])}
    assert {shape for _, shape in ref_calls} == {(2, 1024, out.shape[1])}


def test_fine_window_survives_stage_timers(tiny_checkpoint):
    """The stage timers patch the instance's generate and remove their patch: the class swap stays."""
    model = _load("sdpa+finewin")
    with StageTracker(model, Clock(CPU)):
        pass
    assert type(model.fine_acoustics) is fine_window.WindowedBarkFineModel
    assert "generate" not in model.fine_acoustics.__dict__


def test_fine_window_runs_in_generate(tiny_checkpoint):
    model = _load("sdpa+int8+finewin")
    processor = models.load(models.resolve(TINY, None)).processor
    inputs = processor(["hello there"], return_tensors="pt")
    set_seed(0)
    with torch.inference_mode():
        audio, lengths = model.generate(**inputs, semantic_max_new_tokens=8, semantic_min_new_tokens=8,
                                        return_output_lengths=True)
    assert audio.shape[0] == 1 and int(lengths[0]) > 0


def test_fine_window_is_judged_against_a_reference_with_the_same_window():
    """The window is a format of its own: the implementation is judged against the baseline with the same window
    (exactly), and its cost is measured on the chain, where teacher-forced measures cannot see it."""
    from barkbench import fidelity, references

    opt = variants.REGISTRY["finewin"]
    assert opt.reference == "fine-window" and "padding" in opt.summary
    assert "fine-window" in fidelity.CHAIN_ONLY_FORMATS
    model = _load("eager")
    sim = references.simulate(model, ["fine-window"])
    assert type(sim.fine_acoustics) is fine_window.WindowedBarkFineModel
    assert type(model.fine_acoustics) is not fine_window.WindowedBarkFineModel  # the baseline is left as it was


def test_fidelity_records_the_fine_windows_cost_on_the_chain(tmp_path):
    from barkbench.fidelity import run_fidelity

    report = run_fidelity("synthetic:tiny", "sdpa+finewin", str(tmp_path / "f.json"), "cpu", tokens=16,
                          threads=TORCH_THREADS)
    assert report["status"] == "ok" and report["within_tolerance"], report["violations"]
    chain_cost = report["format_cost"]["chain"]
    assert chain_cost["codes_agreement"] < 1.0  # the window changes the fine codes: a cost, shown as measured
