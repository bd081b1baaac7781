"""Fidelity against eager fp32: the measures on known answers, and whole comparisons on synthetic:tiny,
including deliberately broken variants that must be caught."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from barkbench import attention, fidelity, models, variants
from conftest import TINY, TORCH_THREADS, MaskIgnoredInBatches, swap_attention

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


def test_distribution_stats_known_answers():
    ref = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    same = fidelity.distribution_stats(ref, ref.clone())
    assert same["kl_mean"] == same["kl_max"] == 0.0 and same["same_top1"] == 1.0 and same["max_dp_top"] == 0.0
    assert same["positions"] == 2 and same["margin"] == {"p10": pytest.approx(0.2), "median": pytest.approx(1.0)}
    # a constant shift changes no probability: no KL, but a logit error of the shift
    shifted = fidelity.distribution_stats(ref, ref + 3.0)
    assert shifted["kl_max"] == pytest.approx(0.0, abs=1e-6) and shifted["max_abs"] == pytest.approx(3.0)
    assert shifted["max_rel"] == pytest.approx(1.5)
    # p = (1/2, 1/2) against q = (1/4, 3/4): KL = ln(4/3)/2 = 0.14384 nats; top-1 of p is token 0, its p drops by 1/4
    flip = fidelity.distribution_stats(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]]))
    assert flip["kl_mean"] == pytest.approx(0.143841, abs=1e-5)
    assert flip["max_dp_top"] == pytest.approx(0.25) and flip["same_top1"] == 0.0


def _steps(margins_, width=4):
    """(T, width) logits whose top-1 is token 0, with the given top-1/top-2 margins."""
    out = torch.zeros(len(margins_), width)
    out[:, 0] = torch.tensor(margins_)
    return out


def test_judge_path_flags_only_decisive_divergences():
    ref = torch.tensor([0, 0, 0, 0])
    steps = _steps([1.0, 1.0, 0.01, 1.0])
    same = fidelity.judge_path(ref, ref.clone(), steps, steps.clone(), bound=0.05)
    assert same["prefix"] == 4 and same["agreement"] == 1.0 and same["decisive_mismatches"] == 0
    assert same["decisive_share"] == 0.75 and same["same_context_max_abs"] == 0.0
    # diverging at a near tie (margin 0.01 < 2 x 0.05): reported, not a fault
    cand = torch.tensor([0, 0, 1, 3])
    cand_steps = steps.clone()
    cand_steps[2, 1] = 0.02
    tie = fidelity.judge_path(ref, cand, steps, cand_steps, bound=0.05)
    assert tie["prefix"] == 2 and tie["decisive_mismatches"] == 0 and tie["divergence_margin"] == pytest.approx(0.01)
    assert tie["same_context_max_abs"] == pytest.approx(0.02)  # steps 0..2 only: step 3 saw another context
    # diverging where the margin (1.0) is far above twice the measured error: a fault
    cand_steps = steps.clone()
    cand_steps[1, 1] = 2.0
    fault = fidelity.judge_path(ref, torch.tensor([0, 1, 0, 0]), steps, cand_steps, bound=0.05)
    assert fault["prefix"] == 1 and fault["decisive_mismatches"] == 1 and fault["divergence_margin"] == 1.0
    # with a larger measured error the same step is no longer decisive
    assert fidelity.judge_path(ref, torch.tensor([0, 1, 0, 0]), steps, cand_steps, bound=0.6)["decisive_mismatches"] == 0


def _stats(kl=0.0, dp=0.0, err=0.0):
    return {"positions": 4, "kl_mean": kl, "kl_p99": kl, "kl_max": kl, "same_top1": 1.0, "max_dp_top": dp,
            "max_abs": err, "max_rel": err, "margin": {"p10": 0.1, "median": 0.2}}


def _path(mismatch=0, err=0.0):
    return {"prefix": 4, "length": 4, "agreement": 1.0, "error_bound": 0.0, "decisive_share": 1.0,
            "margin": {"p10": 0.1, "median": 0.2}, "divergence_margin": 0.5 if mismatch else None,
            "decisive_mismatches": mismatch, "same_context_max_abs": err, "same_context_max_rel": err}


def _report(stage=None, free=None, chain_faults=0, codec_snr=None, batched=None):
    tf = {s: _stats() for s in ("semantic", "coarse", "fine[2]", "fine[7]")}
    tf.update(stage or {})
    paths = {"semantic": _path(), "coarse": _path(), **(free or {})}
    rows = batched or [_path(), _path()]
    return {"teacher_forced": tf, "free_running": paths,
            "chain": {"codes_agreement": 1.0, "codes_agreement_per_codebook": {}, "waveform_snr_db": 200.0,
                      "fine_decisions": {"calls": 6, "judged_calls": 6, "decisive_share": 1.0,
                                         "decisive_mismatches": chain_faults, "same_context_max_abs": 0.0,
                                         "same_context_max_rel": 0.0}},
            "codec": {"untouched": codec_snr is None, "snr_db": codec_snr},
            "batched": {"batch_size": 2, "tokens": 4, "rows": rows}}


def test_check_names_each_violation():
    tol = variants.FLOAT_ROUNDING
    assert fidelity.check(tol, _report()) == []
    kl = fidelity.check(tol, _report(stage={"fine[7]": _stats(kl=1.0)}))
    assert kl and all(v.startswith("fine[7] KL") for v in kl)
    assert fidelity.check(tol, _report(stage={"coarse": _stats(dp=0.5)}))[0].startswith("coarse max |Δp|")
    # logit errors are judged relative to the largest |logit|: a large absolute error on large logits passes
    big = _stats(err=1.0)
    assert fidelity.check(tol, _report(stage={"semantic": big}))[0].startswith("semantic logits")
    assert fidelity.check(tol, _report(stage={"semantic": {**big, "max_rel": tol.logits_max_rel / 2}})) == []
    assert fidelity.check(tol, _report(free={"coarse": _path(mismatch=1)}))[0].startswith("coarse tokens: diverged")
    assert fidelity.check(tol, _report(free={"semantic": _path(err=1.0)}))[0].startswith("semantic tokens (same context)")
    assert fidelity.check(tol, _report(chain_faults=3))[0].startswith("chain fine codes: 3")
    assert fidelity.check(tol, _report(codec_snr=30.0))[0].startswith("codec SNR")
    assert fidelity.check(tol, _report(codec_snr=90.0)) == []
    assert fidelity.check(tol, _report(batched=[_path(), _path(mismatch=1)]))[0].startswith("batched row 1")
    # per-stage limits (a lossy format's): a looser limit for one stage accepts there what the fp32 floor does not
    loose = variants.Tolerance(0.06, 4e-4, 5e-4, 8e-4, 40.0, "half", 0.9)
    limits = {"semantic": loose, "coarse": tol, "fine[2]": tol, "fine[7]": tol, "codec": loose}
    within_half = {**_stats(kl=loose.kl_mean / 2, err=loose.logits_max_rel / 2)}
    half = _report(stage={"semantic": within_half}, codec_snr=(loose.min_snr_db + tol.min_snr_db) / 2)
    assert fidelity.check(limits, half) == []
    assert {v.split(" ")[0] for v in fidelity.check(tol, half)} == {"semantic", "codec"}
    # the same measure on another stage, held to the fp32 floor, fails
    assert fidelity.check(limits, _report(stage={"coarse": within_half}))[0].startswith("coarse")
    # top-1 agreement has a floor: one flip is allowed beyond it, two are not
    flips = lambda n: {**_stats(), "positions": 100, "same_top1": 1 - n / 100}
    assert fidelity.check(tol, _report(stage={"coarse": flips(1)})) == []
    assert fidelity.check(tol, _report(stage={"coarse": flips(2)}))[0].startswith("coarse same top-1")
    assert fidelity.check(limits, _report(stage={"semantic": flips(10)})) == []  # floor 0.9: 10 + 1 allowed


def test_stage_limits_come_from_the_reference_alone():
    """The limits are the fp32 floor plus a share of the reference's own distance to the baseline: a format twice
    as costly gets limits that grow accordingly, and an exact variant gets the floor itself."""
    f = variants.FLOAT_ROUNDING
    cost = {"semantic": {**_stats(kl=1e-4, dp=1e-3, err=0.0), "max_rel": 0.01, "same_top1": 0.9}}
    limit = variants.ImplementationLimit(2.0, 0.05, "test")
    one = fidelity.stage_limits(limit, cost, 40.0)["semantic"]
    assert one.logits_max_rel == pytest.approx(f.logits_max_rel + 0.02) and one.kl_mean == pytest.approx(f.kl_mean + 4e-4)
    assert one.max_dp_top == pytest.approx(f.max_dp_top + 2e-3) and one.min_same_top1 == pytest.approx(0.8)
    assert fidelity.stage_limits(limit, cost, 40.0)["codec"].min_snr_db == pytest.approx(40.0 - 20 * math.log10(2))
    exact = fidelity.stage_limits(variants.EXACT, cost, None)["semantic"]
    assert (exact.logits_max_rel, exact.kl_mean, exact.min_same_top1) == (f.logits_max_rel, f.kl_mean, 1.0)


# --- deliberately broken variants, one per failure class, and a healthy one of each class -------------
# Each is a perturbation of a loaded synthetic:tiny model, compared with the package's `compare` and
# judged by `check` under the tolerance of its class.

def _noise_like(t, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g) * scale


def fine_head_noise(model):
    """lm_heads[5] of the fine model (codebook index 6): a weight error no other head shares."""
    w = model.fine_acoustics.lm_heads[5].weight
    with torch.no_grad():
        w.add_(_noise_like(w, w.std().item()))


def mask_ignored_in_batches(model):
    swap_attention(model, MaskIgnoredInBatches)


def sdpa(model):
    attention.use_sdpa(model)


class _CacheRowsSwapped(attention.BarkSdpaAttention):
    """Decoding against the KV cache at bs > 1 reads the next row's keys: only free-running batches see it."""

    def _attn(self, query, key, value, attention_mask=None, query_positions=None):
        if query.shape[0] > 1 and query.shape[-2] == 1:
            key, value = key.roll(1, 0), value.roll(1, 0)
        return super()._attn(query, key, value, attention_mask, query_positions)


def cache_rows_swapped(model):
    swap_attention(model, _CacheRowsSwapped)


def _codec_noise(relative):
    def perturb(model):
        with torch.no_grad():
            for p in model.codec_model.decoder.parameters():
                p.add_(_noise_like(p, relative * p.std().item() if p.numel() > 1 else 0.0))
    return perturb


codec_noise, codec_rounding = _codec_noise(0.05), _codec_noise(1e-7)


def _compiled_fine(broken_idx):
    """A torch.compile'd step in the fine forward with a graph per codebook index (the index is a Python int:
    dynamo specializes on it); with `broken_idx`, that one graph returns wrong logits. The model itself runs
    outside dynamo (`torch._dynamo.disable`) to keep the test fast; the graphs are the compiled logit step."""
    def apply(model):
        inner = torch._dynamo.disable(model.fine_acoustics.forward)

        def logits_step(codebook_idx, logits):
            return logits + 0.5 * torch.sin(logits * 1000.0) if codebook_idx == broken_idx else logits * 1.0

        step = torch.compile(logits_step, backend="eager", dynamic=False)

        def forward(codebook_idx, input_ids, **kwargs):
            out = inner(codebook_idx, input_ids, **kwargs)
            out.logits = step(codebook_idx, out.logits)
            return out

        model.fine_acoustics.forward = forward
    return apply


BROKEN = {  # name: (perturbation, tolerance of its class, what must name the failure)
    "fine-lm_heads[5]": (fine_head_noise, variants.FLOAT_ROUNDING, "fine[6]"),
    "mask-ignored-at-bs>1": (mask_ignored_in_batches, variants.FLOAT_ROUNDING, "semantic"),
    "kv-cache-rows-swapped-at-bs>1": (cache_rows_swapped, variants.FLOAT_ROUNDING, "batched row"),
    "codec-perturbed": (codec_noise, variants.FLOAT_ROUNDING, "codec SNR"),
    "one-compiled-graph": (_compiled_fine(5), variants.FLOAT_ROUNDING, "fine[5]"),
}
HEALTHY = {
    "sdpa": (sdpa, variants.FLOAT_ROUNDING),
    "codec-rounding": (codec_rounding, variants.FLOAT_ROUNDING),
    "compiled-fine": (_compiled_fine(None), variants.FLOAT_ROUNDING),
}


@pytest.fixture(scope="module")
def tiny_baseline(tiny_checkpoint):
    return models.load(models.resolve(TINY))


def _compare(tiny_baseline, perturb):
    candidate = copy.deepcopy(tiny_baseline.model)
    perturb(candidate)
    torch._dynamo.reset()
    return fidelity.compare(tiny_baseline.model, candidate, tiny_baseline.processor, torch.device("cpu"), TOKENS)


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_variant_is_caught(tiny_baseline, name):
    perturb, tol, culprit = BROKEN[name]
    report = _compare(tiny_baseline, perturb)
    violations = fidelity.check(tol, report)
    assert violations and any(v.startswith(culprit) for v in violations), violations


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_variant_passes(tiny_baseline, name):
    perturb, tol = HEALTHY[name]
    report = _compare(tiny_baseline, perturb)
    assert fidelity.check(tol, report) == []
    assert report["codec"]["untouched"] is (not name.startswith("codec"))


def test_compare_covers_every_fine_codebook_and_the_chain(tiny_baseline):
    report = _compare(tiny_baseline, sdpa)
    gc = tiny_baseline.model.generation_config
    n_coarse, n_fine = gc.coarse_acoustics_config["n_coarse_codebooks"], gc.fine_acoustics_config["n_fine_codebooks"]
    fine = [f"fine[{i}]" for i in range(n_coarse, n_fine)]
    assert list(report["teacher_forced"]) == ["semantic", "coarse", *fine]
    assert list(report["chain"]["codes_agreement_per_codebook"]) == fine
    assert report["chain"]["fine_decisions"]["calls"] == len(fine)  # one window, one call per codebook
    assert report["codec"] == {"untouched": True, "snr_db": None}  # same codes, same codec: n/a
    assert report["batched"]["batch_size"] == len(fidelity.PROMPTS) == len(report["batched"]["rows"])
    for stats in report["teacher_forced"].values():
        assert stats["max_abs"] <= 1e-5 and stats["same_top1"] == 1.0


def test_fine_windows_match_generate(tiny_baseline):
    """The positions `fine_windows` says each outer loop decides are the ones fine generate writes."""
    from transformers.models.bark.generation_configuration_bark import (
        BarkCoarseGenerationConfig, BarkFineGenerationConfig, BarkSemanticGenerationConfig)
    model, gc = tiny_baseline.model, tiny_baseline.model.generation_config
    fine_cfg = BarkFineGenerationConfig(**{**gc.fine_acoustics_config, "max_fine_input_length": 64,
                                           "max_fine_history_length": 32})
    for frames in (40, 65, 100):
        coarse = torch.stack([torch.randint(0, gc.codebook_size, (frames,)) + 10_000 + k * gc.codebook_size
                              for k in range(2)])[None]
        with fidelity.StepRecorder(model.fine_acoustics, keep_inputs=True) as rec, torch.inference_mode():
            model.fine_acoustics.generate(coarse, semantic_generation_config=BarkSemanticGenerationConfig(**gc.semantic_config),
                                          coarse_generation_config=BarkCoarseGenerationConfig(**gc.coarse_acoustics_config),
                                          fine_generation_config=fine_cfg, codebook_size=gc.codebook_size, temperature=None)
        windows = fidelity.fine_windows(frames, 64, 32)
        assert len(rec.calls) == 6 * len(windows)
        # a call's decided positions are the only ones of its codebook that change in the next call's input
        for w, (start, stop) in enumerate(windows[:-1]):
            before, after = rec.calls[6 * w][1][0], rec.calls[6 * w + 1][1][0]
            changed = (before[0, :, 2] != after[0, :, 2]).nonzero().flatten()
            assert changed.numel() == 0 or (changed.min() >= start and changed.max() < stop)


def test_the_check_spans_several_windows_of_coarse_and_fine(tiny_baseline):
    """48 semantic tokens give 72 coarse frames: three coarse windows (60 tokens each) and, with the fine
    window shortened to 64 frames (history 32), two fine windows; every step is judged."""
    baseline = copy.deepcopy(tiny_baseline.model)
    baseline.generation_config.fine_acoustics_config.update(max_fine_input_length=64, max_fine_history_length=32)
    candidate = copy.deepcopy(baseline)
    sdpa(candidate)
    report = fidelity.compare(baseline, candidate, tiny_baseline.processor, torch.device("cpu"), 48)
    coarse = report["free_running"]["coarse"]
    assert coarse["length"] > 2 * baseline.generation_config.coarse_acoustics_config["sliding_window_len"]
    assert coarse["agreement"] == 1.0 and coarse["decisive_mismatches"] == 0
    fine = report["chain"]["fine_decisions"]
    assert fine["windows"] == 2 and fine["judged_calls"] == fine["calls"] == 12
    assert report["chain"]["codes_agreement"] == 1.0
    assert fidelity.check(variants.FLOAT_ROUNDING, report) == []


# --- reference simulations against the kernels they stand for ------------------------------------------------

def test_int8_reference_is_torch_dynamic_quantization():
    """The fake-quant simulation gives torch.ao's dynamic int8 Linear (weights per tensor, activations per call on
    0..127) to float rounding, on layers of several shapes, with and without bias; the other schemes do not."""
    from torch.ao.quantization import quantize_dynamic

    from barkbench import references

    torch.manual_seed(0)
    for fan_in, fan_out, bias in ((32, 10048, False), (64, 256, True), (128, 96, False)):
        model = torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out, bias=bias))
        kernel = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        lin = model[0]
        assert torch.equal(torch.round(lin.weight * (1 / references.per_tensor_scale(lin.weight))).clamp(-128, 127),
                           kernel[0].weight().int_repr().float())
        sim = references.FakeQuantLinear(lin, references.fake_quant_symmetric(
            lin.weight, references.per_tensor_scale(lin.weight)), references.fake_quant_activation)
        x = torch.randn(2, 300, fan_in) * 2 + 0.3
        with torch.no_grad():
            y = kernel(x)
            assert (sim(x) - y).abs().max() < 1e-5
            full_range = references.FakeQuantLinear(lin, sim.weight, lambda t: references.fake_quant_activation(t, 255))
            assert (full_range(x) - y).abs().max() > 1e-3


def test_each_lossy_optimization_names_a_reference_simulation():
    from barkbench import references

    for opt in variants.REGISTRY.values():
        assert opt.reference is None or opt.reference in references.FORMATS, opt.name
    assert variants.parse("sdpa+bf16").reference_formats == ["bf16"]
    assert variants.parse("sdpa+static+compile").reference_formats == []
    assert variants.parse("int8").limit.layer_share < 1.0 <= variants.parse("int8").limit.model_share


# --- faults near the limits, and the correct variants beside them (held-out: check inputs, seed 0) -------------

@pytest.fixture(scope="module")
def fault_suite(tiny_checkpoint):
    from barkbench import faults

    source = models.resolve(TINY)
    base = fidelity._load(source, variants.parse("eager"), torch.device("cpu"))
    rows, kept = {}, {}
    for case in faults.CASES:  # as `python -m barkbench.faults` runs them: each format's reference kept
        torch._dynamo.reset()
        rows[case.name] = faults.judge(source, case, torch.device("cpu"), TOKENS, base, kept)
    print("\n" + faults.table(list(rows.values())))  # the separation (pytest -s)
    return rows


@pytest.mark.parametrize("name", ["int8: activation quantized twice", "exact: one op (fine lm_heads[3], codebook 4) in bf16"])
def test_a_case_judged_alone_measures_as_in_the_suite(fault_suite, name):
    """What the suite keeps from earlier cases (the reference, its limits, its side of the measures) changes
    nothing: the case judged alone, from a fresh reference, gives the same distance and violations."""
    from barkbench import faults

    case = next(c for c in faults.CASES if c.name == name)
    alone = faults.judge(models.resolve(TINY), case, torch.device("cpu"), TOKENS)
    assert alone["distance"] == fault_suite[name]["distance"]
    assert alone["violations"] == fault_suite[name]["violations"]


@pytest.mark.parametrize("name", [c.name for c in __import__("barkbench.faults").faults.CASES])
def test_fault_suite(fault_suite, name):
    from barkbench import faults

    row, case = fault_suite[name], next(c for c in faults.CASES if c.name == name)
    summary = faults.table(list(fault_suite.values()))
    if case.fault:
        assert row["caught"] and row["named"] and row["distance"] > 1.0, summary
    else:
        assert not row["violations"] and row["distance"] <= 1.0, summary


def test_limits_do_not_move_with_the_candidate(fault_suite):
    """A fault and the correct variant of the same optimization are judged against the same limits."""
    by_variant: dict = {}
    for row in fault_suite.values():
        by_variant.setdefault(row["variant"], []).append(json.dumps(row["limits"], sort_keys=True))
    assert all(len(set(v)) == 1 for v in by_variant.values())


def test_the_suite_record_reaches_the_report_with_its_separation(fault_suite, tmp_path):
    """The record the workflow's `faults` job writes, read back by `aggregate` from where the layout puts it, and
    its section: each case's distance and verdict; a record in another model's place is refused."""
    from barkbench import faults, layout
    from barkbench.fragments import faults_md
    from barkbench.markdown import md_escape
    from barkbench.records import ResultError
    from barkbench.tables import faults_table

    root = tmp_path / "results"
    path = root / layout.FAULTS.format(hardware="cpu-test", model=layout.slug(TINY))
    path.parent.mkdir(parents=True)
    rows = list(fault_suite.values())
    faults.record(TINY, torch.device("cpu"), TOKENS, rows, "t0").save_json(path)
    table = faults_table([path], root)
    assert list(table["case"]) == [r["case"] for r in rows] and set(table["hardware"]) == {"cpu-test"}
    md = faults_md(table)
    assert "every fault caught, every correct variant within" in md
    for r in rows:
        shown = "∞" if math.isinf(r["distance"]) else f"{r['distance']:.3g}"
        assert f"| {md_escape(r['case'])} | {r['variant']} | {'fault' if r['fault'] else 'correct'} | {shown} |" in md
    wrong = root / layout.FAULTS.format(hardware="cpu-test", model="another--model")
    wrong.parent.mkdir(parents=True)
    wrong.write_text(path.read_text())
    with pytest.raises(ResultError, match="another--model/faults.json: holds the fault suite of synthetic:tiny, not "
                                          "what its place"):
        faults_table([wrong], root)
    truncated = root / layout.FAULTS.format(hardware="cpu-test", model=layout.slug(TINY))
    truncated.write_text(path.read_text()[:200])
    with pytest.raises(ResultError, match="faults.json: not valid JSON"):  # a typed record, read as the others
        faults_table([truncated], root)


def test_the_suite_stops_at_the_runs_deadline_and_says_what_it_did_not_run(tiny_checkpoint, tmp_path, monkeypatch):
    from barkbench import faults, layout
    from barkbench.fragments import faults_md
    from barkbench.protocol import DEADLINE_ENV
    from barkbench.tables import faults_table

    monkeypatch.setenv(DEADLINE_ENV, str(__import__("time").time() - 1.0))  # the run's budget already spent
    out = tmp_path / "results" / layout.FAULTS.format(hardware="cpu-test", model=layout.slug(TINY))
    faults.main([TINY, "--tokens", str(TOKENS), "--threads", str(TORCH_THREADS), "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == [c.name for c in faults.CASES]
    assert all(r["not_run"] == "run budget exhausted" and r["caught"] is None for r in rows)
    md = faults_md(faults_table([out], tmp_path / "results"))
    assert "not run, the run's budget spent" in md and "| not run |" in md and "MISSED" not in md


def test_a_workflow_run_sets_aside_the_cases_that_cannot_pay_off_here(tiny_checkpoint, tmp_path, monkeypatch):
    """On a CPU without native bf16, a workflow run's suite (its probe set BARKBENCH_BASELINE_CALL_S) records the
    bf16 cases as set aside, with why, instead of spending a quarter of an hour on emulated bf16; the run's estimate
    counts the cases it judges. The other cases here meet a spent budget."""
    from barkbench import faults, layout
    from barkbench.fragments import faults_md
    from barkbench.protocol import BASELINE_CALL_ENV, DEADLINE_ENV
    from barkbench.tables import faults_table

    monkeypatch.setattr(fidelity.provenance, "cpu_features", lambda: ["avx2"])
    monkeypatch.setenv(BASELINE_CALL_ENV, json.dumps({TINY: [1.0, 1]}))
    monkeypatch.setenv(DEADLINE_ENV, str(__import__("time").time() - 1.0))
    out = tmp_path / "results" / layout.FAULTS.format(hardware="cpu-test", model=layout.slug(TINY))
    faults.main([TINY, "--tokens", str(TOKENS), "--threads", str(TORCH_THREADS), "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    aside = [r["case"] for r in rows if r["not_run"].startswith("set aside in this run: bf16 needs avx512_bf16")]
    assert aside == ["bf16", "sdpa+bf16", "bf16: softmax without fp32 accumulation"]
    assert all(r["not_run"] == "run budget exhausted" for r in rows if r["case"] not in aside)
    assert faults.cases_in_a_workflow_run(["avx2"]) == len(rows) - len(aside)
    assert faults.cases_in_a_workflow_run(["avx2", "amx_bf16"]) == len(rows)
    md = faults_md(faults_table([out], tmp_path / "results"))
    assert "not run, set aside in this run: bf16 needs" in md and "not run, the run's budget spent: sdpa, int8" in md


# --- the recorded job --------------------------------------------------------------------------------

def _run(variant, tmp_path):
    out = tmp_path / f"{variant}.json"
    report = fidelity.run_fidelity(TINY, variant, str(out), device_name="cpu", tokens=TOKENS, threads=TORCH_THREADS)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    return report


def test_a_check_takes_the_cores_a_run_takes_whatever_omp_num_threads_says(tiny_checkpoint, tmp_path):
    """Snakemake exports OMP_NUM_THREADS=1 to a job under --cores 1, and torch starts with one thread: a fidelity
    check, as a run, takes every physical core unless told otherwise (its baseline side is not timed, but a run's
    budget is)."""
    import os

    import psutil

    try:
        torch.set_num_threads(1)
        # fp16 on a CPU is not applicable: the check loads nothing and still records its threads
        default = fidelity.run_fidelity(TINY, "fp16", str(tmp_path / "a.json"), device_name="cpu")
        assert default["hardware"]["torch_threads"] == (psutil.cpu_count(logical=False) or os.cpu_count())
        three = fidelity.run_fidelity(TINY, "fp16", str(tmp_path / "b.json"), device_name="cpu", threads=3)
        assert three["hardware"]["torch_threads"] == 3
    finally:
        torch.set_num_threads(TORCH_THREADS)


def test_sdpa_is_within_tolerance(tiny_checkpoint, tmp_path):
    report = _run("sdpa", tmp_path)
    assert report["status"] == "ok", report["reason"]
    assert report["within_tolerance"] is True and report["violations"] == []
    assert report["schema_version"] == fidelity.SCHEMA_VERSION
    assert report["model"] == {"requested": TINY, "id": TINY, "weights": "synthetic"}
    assert report["tokens_compared"] == TOKENS
    assert report["tolerance"]["kl_mean"] == variants.FLOAT_ROUNDING.kl_mean
    assert report["free_running"]["semantic"]["prefix"] == TOKENS == report["free_running"]["semantic"]["length"]
    assert report["free_running"]["coarse"]["agreement"] == 1.0 and report["free_running"]["coarse"]["length"] > TOKENS
    assert report["chain"]["codes_agreement"] == 1.0 and report["codec"]["snr_db"] is None


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
    assert report["teacher_forced"] is None and report["within_tolerance"] is None


def test_bf16_report_is_produced(tiny_checkpoint, tmp_path):
    """bf16 is judged against its reference (the baseline cast to bf16), and its cost is reported apart, without a
    verdict on synthetic weights."""
    report = _run("bf16", tmp_path)
    assert report["status"] == "ok", report["reason"]
    assert report["within_tolerance"] is True and report["violations"] == []
    assert report["reference"]["formats"] == ["bf16"] and report["reference"]["compared_with"] == "reference simulation"
    assert set(report["limits"]) == {*report["teacher_forced"], "codec"}
    cost = report["format_cost"]
    assert cost["within_targets"] is None and cost["verdict_reason"] == fidelity.SYNTHETIC_COST_REASON
    for name, stats in cost["reference"].items():  # bf16 does change the numbers; the check's limits follow from them
        assert 0.0 < stats["kl_mean"] and 0.0 < stats["same_top1_sigma"] < 0.5, name
        assert report["limits"][name]["kl_mean"] > variants.FLOAT_ROUNDING.kl_mean
    assert cost["codec_snr_db"]["reference"] < 200.0  # bf16 codec too
    assert report["limits_measured"]["device"] == "cpu" and report["limits_measured"]["warning"] is None
    # the report shows the implementation verdict and the format's cost apart, and where the limits were measured
    from pathlib import Path

    from barkbench import fragments, tables
    from barkbench.records import FidelityResult

    path = tmp_path / "bf16.json"
    md = fragments.fidelity_md(tables.fidelity_table([("cpu-x", Path(path), FidelityResult.from_dict(report, path))]))
    verdicts, cost = md.split("### What each number format costs")
    assert "| bf16 simulation | yes |" in verdicts and "cpu, synthetic weights, synthetic:tiny" in verdicts
    assert cost.count("no verdict (below)") == len(report["teacher_forced"]) and fidelity.SYNTHETIC_COST_REASON in cost


def test_cost_verdict_only_on_hub_weights_against_written_targets():
    logits = {"semantic": torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])}
    worse = {"semantic": logits["semantic"] * 0.5}
    targets = {"int8-dynamic": {"kl_mean": 1e-6, "same_top1": 0.99, "source": "a paper"}}
    synthetic = fidelity.format_cost(logits, worse, worse, None, None, "synthetic", ["int8-dynamic"], targets)
    assert synthetic["within_targets"] is None and synthetic["verdict_reason"] == fidelity.SYNTHETIC_COST_REASON
    none = fidelity.format_cost(logits, worse, worse, None, None, "hub", ["int8-dynamic"], None)
    assert none["within_targets"] is None and "no cost target" in none["verdict_reason"]
    hub = fidelity.format_cost(logits, worse, worse, None, None, "hub", ["int8-dynamic"], targets)
    assert hub["within_targets"] is False and "a paper" in hub["misses"][0]
    same = fidelity.format_cost(logits, logits, logits, None, None, "hub", ["int8-dynamic"], targets)
    assert same["within_targets"] is True


def test_kl_report_known_answers():
    # p = (1/2, 1/2) against q = (1/4, 3/4): KL = ln(4/3)/2; Δp of p's top token (0) is -1/4; top-1 differs
    r = fidelity.kl_report(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]))
    assert r["kl_mean"] == pytest.approx(0.143841 / 2, abs=1e-5) and r["kl"]["max"] == pytest.approx(0.143841, abs=1e-5)
    assert r["dp"]["p1"] == pytest.approx(-0.25, abs=0.01) and r["dp"]["rms"] == pytest.approx(0.25 / math.sqrt(2))
    assert r["same_top1"] == 0.5 and r["same_top1_sigma"] == pytest.approx(math.sqrt(0.25 / 2))


def test_decode_places_the_codec_as_generate_does_under_offload(tiny_baseline):
    """accelerate's offload hooks move a sub-model only when its forward runs; codec_decode never calls the
    codec's forward, so the codec is moved to the model's device by hand (and offloaded after), as
    BarkModel.generate does."""
    model, events = copy.deepcopy(tiny_baseline.model), []

    class Hook:
        def __init__(self, name):
            self.name = name

        def offload(self):
            events.append(f"offload {self.name}")

    codec_to = model.codec_model.to

    def to(*args, **kwargs):
        events.append(f"codec to {args[0]}")
        return codec_to(*args, **kwargs)

    codes = torch.zeros(1, 8, 75, dtype=torch.long)
    plain = fidelity.decode(model, codes)
    assert events == []  # no offload: nothing moved
    model.fine_acoustics_hook, model.codec_model_hook = Hook("fine"), Hook("codec")
    model.codec_model.to = to
    try:
        audio = fidelity.decode(model, codes)
    finally:
        del model.fine_acoustics_hook, model.codec_model_hook, model.codec_model.to
    assert events == ["offload fine", f"codec to {model.device}", "offload codec"]
    assert np.array_equal(audio, plain)


def test_a_compiled_static_decode_step_passes_the_whole_check(tiny_checkpoint, tmp_path):
    """The check runs the candidate at several batch sizes and records its steps: each is a new graph of the
    compiled (fullgraph) decode step, which must not fail the check."""
    torch._dynamo.reset()
    report = _run("sdpa+static+compile", tmp_path)
    assert report["status"] == "ok", report["reason"]
    assert report["within_tolerance"] is True, report["violations"]


def test_cost_targets_need_a_known_format_and_a_source():
    ok = fidelity.parse_cost_targets('{"int8-dynamic": {"kl_mean": 0.01, "source": "llama.cpp Q8_0 on a 7B model"}}')
    assert ok["int8-dynamic"]["kl_mean"] == 0.01
    for bad in ('{"int9": {"kl_mean": 0.01, "source": "x"}}', '{"bf16": {"kl_mean": 0.01}}',
                '{"bf16": {"source": "x"}}', '{"bf16": {"kl_max": 1, "source": "x"}}', '[1]'):
        with pytest.raises(ValueError):
            fidelity.parse_cost_targets(bad)


def test_a_fidelity_check_past_its_time_limit_is_recorded_failed(tiny_checkpoint, tmp_path, monkeypatch):
    import time

    from barkbench.fidelity import run_fidelity
    from barkbench.records import FidelityResult

    loader = fidelity._load

    def slow_load(*args, **kwargs):  # a load that outlasts the limit, wherever the machine is fast
        time.sleep(5)
        return loader(*args, **kwargs)

    monkeypatch.setattr(fidelity, "_load", slow_load)
    out = tmp_path / "fidelity" / "sdpa.json"
    report = run_fidelity(TINY, "sdpa", out, "cpu", tokens=4, time_limit_s=0.05, threads=TORCH_THREADS)
    assert report["status"] == "failed" and report["reason"] == "time limit 0 s reached"
    assert FidelityResult.from_json(out).status == "failed"


def test_a_workflow_run_sets_aside_the_check_of_a_variant_that_cannot_pay_off_here(tmp_path, monkeypatch):
    """On a CPU without native bf16, a workflow run (its probe set BARKBENCH_BASELINE_CALL_S) records sdpa+bf16's
    check as not checked, with why, instead of spending several emulated-bf16 calls on it; a check by hand runs."""
    from barkbench.protocol import BASELINE_CALL_ENV

    monkeypatch.setattr(fidelity.provenance, "cpu_features", lambda: ["avx2"])
    bf16, cpu = variants.parse("sdpa+bf16"), torch.device("cpu")
    assert fidelity.set_aside_in_this_run(bf16, cpu, TINY) is None  # by hand
    monkeypatch.setenv(BASELINE_CALL_ENV, json.dumps({TINY: [1.0, 1]}))
    report = fidelity.run_fidelity(TINY, "sdpa+bf16", str(tmp_path / "f.json"), device_name="cpu",
                                   threads=TORCH_THREADS)
    assert report["status"] == "not_applicable"
    assert report["reason"].startswith("not checked in this run: bf16 needs avx512_bf16 or amx_bf16 to pay off")
    assert fidelity.set_aside_in_this_run(variants.parse("sdpa+int8"), cpu, TINY) is None  # int8 pays off with AVX2
    monkeypatch.setattr(fidelity.provenance, "cpu_features", lambda: ["avx2", "avx512f", "amx_bf16"])
    assert fidelity.set_aside_in_this_run(bf16, cpu, TINY) is None
