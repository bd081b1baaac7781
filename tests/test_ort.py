"""ONNX Runtime as a variant (`ort`): the exported sub-models compute what PyTorch computes (to fp32 rounding), with
the same tokens out of Bark's generate, the export is cached per weights, and the variant runs through the
benchmark or is recorded as not applicable where ONNX Runtime cannot import."""
from __future__ import annotations

import sys

import pytest
import torch

from barkbench import fidelity, ort_runtime, runner, variants
from barkbench.protocol import DEFAULT_PROMPTS, Protocol
from barkbench.records import RunResult
from conftest import TINY, TORCH_THREADS, load_variant, stage_tokens

CPU = torch.device("cpu")
pytestmark = [pytest.mark.skipif(ort_runtime.unavailable_reason() is not None,
                                 reason=ort_runtime.unavailable_reason() or ""),
              pytest.mark.xdist_group("ort")]  # one worker exports the tiny model once


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    return load_variant("finewin")


@pytest.fixture(scope="module")
def on_ort(tiny_checkpoint):
    return load_variant("finewin+ort")


def test_spelling_and_conflicts():
    assert variants.canonical("ort+finewin") == "finewin+ort"
    for other, why in (("sdpa", "cannot be combined"), ("int8", "cannot be combined"), ("compile", "both set")):
        with pytest.raises(variants.VariantError, match=why):
            variants.parse(f"{other}+ort")
    assert "CPU execution provider" in variants.REGISTRY["ort"].cuda_reason


def test_every_sub_model_matches_pytorch_to_fp32_rounding(eager, on_ort):
    """Teacher-forced logits of every sub-model and fine codebook, including the semantic model's left-padded row
    (the key padding mask must reach ONNX Runtime's attention), within the exact variants' limit."""
    ref = fidelity.teacher_forced_logits(eager.model, CPU)
    got = fidelity.teacher_forced_logits(on_ort.model, CPU)
    assert set(got) == set(ref) and len(ref) == 8
    for name in ref:
        rel = (got[name] - ref[name]).abs().max().item() / ref[name].abs().max().item()
        assert rel <= variants.FLOAT_ROUNDING.logits_max_rel, (name, rel)


def _freed(sub, names) -> int:
    """Bytes of the tensors of `sub`'s modules `names` that none of its other modules shares (the fine heads are tied
    to embeddings that stay)."""
    from barkbench import models

    prefixes = tuple(f"{name}." for name in names)
    state = sub.state_dict(keep_vars=True)
    shared = {id(t) for key, t in state.items() if not key.startswith(prefixes)}
    inside = {id(t): t for key, t in state.items() if key.startswith(prefixes) and id(t) not in shared}
    return sum(models.tensor_bytes(t) for t in inside.values())


def test_holds_the_onnx_runtime_weights_only(eager, on_ort):
    """The PyTorch weights each graph replaces are freed: on the meta device nothing computes, so the logits that
    still come are ONNX Runtime's. The token embeddings stay. The record's weights count the sessions' instead, and a
    decode step's bytes and matmuls alone are the graph's: the same weights as PyTorch's, by an independent count."""
    from barkbench import calibration, models

    model, fp32 = on_ort.model, eager.model
    subs = {"semantic": (model.semantic, fp32.semantic), "coarse": (model.coarse_acoustics, fp32.coarse_acoustics),
            "fine": (model.fine_acoustics, fp32.fine_acoustics)}
    replaced = held = 0
    for kind, (sub, kept) in subs.items():
        assert all(t.is_meta for name in ort_runtime.REPLACED[kind] for t in getattr(sub, name).state_dict().values())
        embeddings = sub.input_embeds_layers if kind == "fine" else sub.input_embeds_layer
        assert not any(t.is_meta for t in embeddings.state_dict().values())
        replaced += _freed(kept, ort_runtime.REPLACED[kind])
        held += sub.runtime_weight_bytes
        # the session holds the same fp32 parameters (the fine heads stacked into one), and a few constants
        params = sum(p.numel() * p.element_size() for name in ort_runtime.REPLACED[kind]
                     for p in getattr(kept, name).parameters())
        assert abs(sub.runtime_weight_bytes - params) <= 0.01 * params, kind
    logits = model.semantic(input_ids=torch.randint(0, 10_000, (1, 7))).logits
    assert logits.shape[-1] == model.semantic.config.output_vocab_size and torch.isfinite(logits).all()
    assert models.weights_bytes(model) == models.weights_bytes(fp32) - replaced + held
    for kind in ("semantic", "coarse"):
        sub, kept = subs[kind]
        pytorch_read = calibration.bytes_read_per_step(kept)  # every parameter but the embedding tables
        assert abs(calibration.bytes_read_per_step(sub) - pytorch_read) <= 0.001 * pytorch_read
        alone = calibration.decode_matmuls_seconds(sub, rows=1, budget_s=0.01)
        assert alone["matmuls"] == len(calibration.decode_matmuls(kept)) and alone["seconds"] > 0


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_gives_the_same_tokens(eager, on_ort, do_sample):
    """Bark's generate on ONNX Runtime: the tokens of every stage equal PyTorch's, greedy and sampled, at batch 2
    (prefill with an empty past, decode steps against generate's DynamicCache, the fine model's short window)."""
    ref = stage_tokens(eager, DEFAULT_PROMPTS[:2], do_sample=do_sample)
    got = stage_tokens(on_ort, DEFAULT_PROMPTS[:2], do_sample=do_sample)
    for stage in ("semantic", "coarse", "fine"):
        assert torch.equal(got[stage], ref[stage]), stage


def test_export_is_cached_per_weights(eager, on_ort):
    """A second export of the same weights reuses the cached file (the variant's, whose PyTorch weights it freed);
    one changed weight is a new export key."""
    sub = eager.model.coarse_acoustics
    path = ort_runtime.exported(sub, "coarse")
    stamp = path.stat().st_mtime_ns
    assert ort_runtime.exported(sub, "coarse") == path and path.stat().st_mtime_ns == stamp
    key = ort_runtime.fingerprint(sub, "coarse")
    weight = sub.layers[1].attn.out_proj.weight.data
    saved = weight[0, 0].item()
    weight[0, 0] += 1.0
    try:
        assert ort_runtime.fingerprint(sub, "coarse") != key
    finally:
        weight[0, 0] = saved
    assert ort_runtime.fingerprint(sub, "coarse") == key


def _protocol() -> Protocol:
    return Protocol(warmup=1, min_iterations=1, max_iterations=1, batch_size=1, max_new_tokens=8, do_sample=False)


def test_ort_runs_through_the_benchmark(tiny_checkpoint, tmp_path):
    result = runner.run(runner.RunRequest(TINY, "finewin+ort", _protocol(), device="cpu", threads=TORCH_THREADS),
                        tmp_path / "finewin+ort" / "bs1.json")
    RunResult.from_dict(result.to_dict())
    assert result.status == "ok", result.reason
    assert any("ONNX Runtime" in note for note in result.variant["notes"])
    assert set(result.iterations.stages) >= {"semantic", "coarse", "fine"}


def test_ort_is_not_applicable_when_onnxruntime_cannot_import(monkeypatch, tmp_path):
    ort_runtime._runtime_problem.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    try:
        reason = variants.parse("ort").not_applicable_reason(CPU)
        assert reason.startswith("not applicable here: ONNX Runtime or the ONNX exporter is not usable (")
        result = runner.run(runner.RunRequest(TINY, "ort", _protocol(), device="cpu", threads=TORCH_THREADS),
                            tmp_path / "ort" / "bs1.json")
        assert result.status == "not_applicable" and result.reason == reason
    finally:
        ort_runtime._runtime_problem.cache_clear()
