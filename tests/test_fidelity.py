"""Fidelity against eager fp32: the measures on known answers, and whole comparisons on synthetic:tiny,
including deliberately broken variants that must be caught."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from barkbench import attention, fidelity, variants
from conftest import TINY

SR = 24_000
TOKENS = 8


def _sine(freq=440.0, amplitude=0.5, seconds=1.0):
    t = np.arange(int(SR * seconds)) / SR
    return amplitude * np.sin(2 * np.pi * freq * t)


# --- measures ------------------------------------------------------------------------------------

def test_snr_identical_is_capped():
    x = _sine()
    assert fidelity.snr_db(x, x.copy()) == fidelity.SNR_CAP_DB == 200.0
    assert fidelity.snr_db(x.astype(np.float32), x.astype(np.float32)) == 200.0


def test_snr_noise_at_a_tenth_is_20_db():
    x = _sine()
    rng = np.random.default_rng(0)
    rms = float(np.sqrt(np.mean(x**2)))
    noisy = x + rng.normal(0.0, rms / 10.0, x.size)
    assert fidelity.snr_db(x, noisy) == pytest.approx(20.0, abs=0.5)
    # a tone at a tenth of the amplitude: exactly 20 dB over whole periods
    assert fidelity.snr_db(x, x + _sine(1000.0, 0.05)) == pytest.approx(20.0, abs=0.01)
    # half the amplitude: noise is a quarter of the signal power, 6.02 dB
    assert fidelity.snr_db(x, 0.5 * x) == pytest.approx(10 * np.log10(4.0), abs=1e-9)


def test_snr_edge_cases():
    x = _sine()
    assert fidelity.snr_db(np.zeros(100), np.ones(100)) == -200.0
    # compared over the shorter length
    assert fidelity.snr_db(x, np.concatenate([x, np.ones(500)])) == 200.0
    assert fidelity.snr_db(x, -x) == pytest.approx(10 * np.log10(1 / 4))


def test_prefix_agreement():
    ref = torch.tensor([[1, 2, 3, 4]])
    same = fidelity.prefix_agreement(ref, ref.clone())
    assert same == {"prefix": 4, "length": 4, "agreement": 1.0}
    half = fidelity.prefix_agreement(ref, torch.tensor([[1, 2, 9, 4]]))
    assert half == {"prefix": 2, "length": 4, "agreement": 0.5}
    assert fidelity.prefix_agreement(ref, torch.tensor([[0, 2, 3, 4]]))["prefix"] == 0
    # the shortest identical prefix over the batch
    batch_ref = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    batch = torch.tensor([[1, 2, 3, 4, 0], [6, 0, 8, 9, 10]])
    assert fidelity.prefix_agreement(batch_ref, batch) == {"prefix": 1, "length": 5, "agreement": 0.2}
    # a shorter candidate counts against the reference's length
    assert fidelity.prefix_agreement(ref, torch.tensor([[1, 2]])) == {"prefix": 2, "length": 4, "agreement": 0.5}


def _report(abs_err=1e-6, rel_err=1e-6, agreement=1.0, snr=200.0):
    return {"logits": {s: {"max_abs": abs_err, "max_rel": rel_err} for s in fidelity.SUB_MODELS},
            "tokens": {s: {"prefix": int(agreement * 10), "length": 10, "agreement": agreement}
                       for s in ("semantic", "coarse")},
            "waveform_snr_db": snr}


def test_check_flags_violations():
    tol = variants.FLOAT_ROUNDING
    assert fidelity.check(tol, _report()) == []
    logits = fidelity.check(tol, _report(abs_err=0.1, rel_err=0.1))
    assert len(logits) == 3 and all("logits" in v for v in logits)
    assert any(v.startswith("semantic logits") for v in logits)
    # a violation needs both the absolute and the relative error out of bounds
    assert fidelity.check(tol, _report(abs_err=0.1, rel_err=1e-6)) == []
    assert fidelity.check(tol, _report(abs_err=1e-6, rel_err=0.1)) == []
    tokens = fidelity.check(tol, _report(agreement=0.5))
    assert len(tokens) == 2 and all("tokens" in v for v in tokens)
    snr = fidelity.check(tol, _report(snr=30.0))
    assert len(snr) == 1 and "SNR" in snr[0]
    # the looser half-precision tolerance accepts what fp32 rounding does not
    assert fidelity.check(variants.HALF, _report(abs_err=0.1, rel_err=0.01, agreement=0.6, snr=30.0)) == []
    assert len(fidelity.check(tol, _report(abs_err=0.1, rel_err=0.1, agreement=0.5, snr=30.0))) == 6


# --- whole comparisons on synthetic:tiny --------------------------------------------------------------

def _run(variant, tmp_path):
    out = tmp_path / f"{variant}.json"
    report = fidelity.run_fidelity(TINY, variant, str(out), device_name="cpu", tokens=TOKENS)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    return report


def test_sdpa_is_within_tolerance(tiny_checkpoint, tmp_path):
    report = _run("sdpa", tmp_path)
    assert report["status"] == "ok", report["reason"]
    assert report["within_tolerance"] is True and report["violations"] == []
    assert report["model"] == {"requested": TINY, "id": TINY, "weights": "synthetic"}
    assert report["tokens_compared"] == TOKENS
    assert report["tolerance"]["logits_max_abs"] == variants.FLOAT_ROUNDING.logits_max_abs
    assert set(report["logits"]) == set(fidelity.SUB_MODELS)
    for name, err in report["logits"].items():
        assert err["max_abs"] <= 1e-5, name
    assert report["tokens"]["semantic"] == {"prefix": TOKENS, "length": TOKENS, "agreement": 1.0}
    assert report["tokens"]["coarse"]["agreement"] == 1.0 and report["tokens"]["coarse"]["length"] > TOKENS
    assert report["waveform_snr_db"] == 200.0  # same codes, same codec


def _noisy_lm_head(model, ctx):
    g = torch.Generator().manual_seed(0)
    w = model.semantic.lm_head.weight
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=g) * 0.05)


class _MaskIgnoringAttention(attention.BarkSdpaAttention):
    """An SDPA attention that drops the padding mask (the BetterTransformer bug)."""

    def _attn(self, query, key, value, attention_mask=None, query_positions=None):
        return super()._attn(query, key, value, None, query_positions)


def _swap_to_mask_ignoring_attention(model, ctx):
    for module in model.modules():
        if type(module) is attention.BarkSelfAttention:
            module.__class__ = _MaskIgnoringAttention


@pytest.mark.parametrize("apply,culprit", [(_noisy_lm_head, "semantic logits"),
                                           (_swap_to_mask_ignoring_attention, "semantic logits")],
                         ids=["noisy-lm-head", "mask-ignoring-attention"])
def test_broken_variant_is_caught(tiny_checkpoint, tmp_path, monkeypatch, apply, culprit):
    monkeypatch.setitem(variants.REGISTRY, "broken", variants.Optimization(
        "broken", "deliberately wrong", group="attention", apply=apply))
    report = _run("broken", tmp_path)
    assert report["status"] == "ok", report["reason"]
    assert report["within_tolerance"] is False
    assert report["violations"], report
    assert any(v.startswith(culprit) for v in report["violations"]), report["violations"]
    assert report["violations"] == fidelity.check(variants.FLOAT_ROUNDING, report)


def test_failing_variant_is_recorded(tiny_checkpoint, tmp_path, monkeypatch):
    def explode(model, ctx):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(variants.REGISTRY, "explode", variants.Optimization("explode", "", apply=explode))
    report = _run("explode", tmp_path)
    assert report["status"] == "failed"
    assert report["reason"] == "RuntimeError: kernel exploded"
    assert "kernel exploded" in report["error"]
    assert report["within_tolerance"] is None


def test_not_applicable_variant_is_recorded(tmp_path):
    report = _run("fp16", tmp_path)
    assert report["status"] == "not_applicable"
    assert report["reason"].startswith("not applicable on cpu")
    assert report["logits"] is None and report["within_tolerance"] is None


def test_bf16_report_is_produced(tiny_checkpoint, tmp_path):
    report = _run("bf16", tmp_path)
    assert report["status"] == "ok", report["reason"]
    assert isinstance(report["within_tolerance"], bool)
    assert report["violations"] == fidelity.check(variants.HALF, report)
    assert report["within_tolerance"] == (not report["violations"])
    assert report["tolerance"]["min_snr_db"] == variants.HALF.min_snr_db
    for name, err in report["logits"].items():  # bf16 does change the numbers, within half precision
        assert 0.0 < err["max_abs"] < 1.0, name
    assert -200.0 <= report["waveform_snr_db"] < 200.0
    assert 0.0 <= report["tokens"]["coarse"]["agreement"] <= 1.0
