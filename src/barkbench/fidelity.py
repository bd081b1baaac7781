"""Does an optimization keep the output? A variant against the baseline variant (eager fp32 by default)
on the same inputs:

- teacher-forced logits of each sub-model (max abs error, and max error relative to the logits' range);
- greedily decoded semantic tokens, and coarse tokens decoded from the baseline's semantic tokens
  (identical-prefix length and its share of the tokens compared);
- the waveform EnCodec decodes from the same fine codes (SNR in dB, capped where bit-identical);
- a padded batch (`padded_batch`): 8 prompts of different lengths, where an attention that ignores the
  mask (optimum's BetterTransformer for Bark) lets real tokens attend to padding.
"""
from __future__ import annotations

import math
import os
import time
import traceback

import numpy as np
import torch

from . import models, provenance, variants
from .protocol import DEADLINE_ENV, DEFAULT_PROMPTS
from .records import FidelityResult
from .runner import _now, _quiet_transformers

SNR_CAP_DB = 200.0  # a bit-identical waveform has infinite SNR; JSON needs a number
SUB_MODELS = ("semantic", "coarse", "fine")
PADDED_BATCH = 8  # the 2023 study's batch size


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    n = min(reference.size, candidate.size)
    reference, candidate = reference[:n], candidate[:n]
    noise = float(np.sum((reference - candidate) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return SNR_CAP_DB
    if signal == 0.0:
        return -SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10.0 * math.log10(signal / noise)))


def logits_error(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    reference, candidate = reference.float(), candidate.float()
    diff = (reference - candidate).abs().max().item()
    scale = reference.abs().max().item() or 1.0
    return {"max_abs": diff, "max_rel": diff / scale}


def prefix_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Length of the identical prefix (the shortest over the batch) and its share of the length."""
    reference, candidate = reference.cpu(), candidate.cpu()
    n = min(reference.shape[-1], candidate.shape[-1])
    same = (reference[..., :n] == candidate[..., :n]).reshape(-1, n)
    prefix = int(min((row.logical_not().nonzero()[0].item() if not row.all() else n) for row in same))
    return {"prefix": prefix, "length": int(reference.shape[-1]), "agreement": prefix / max(1, reference.shape[-1])}


def check(tol: variants.Tolerance, report: dict) -> list[str]:
    """Every way `report` falls outside the tolerance, in words (empty: within tolerance)."""
    violations = []
    for name, err in report["logits"].items():
        if err["max_abs"] > tol.logits_max_abs and err["max_rel"] > tol.logits_max_rel:
            violations.append(f"{name} logits: max abs {err['max_abs']:.3g} > {tol.logits_max_abs:g} "
                              f"and max rel {err['max_rel']:.3g} > {tol.logits_max_rel:g}")
    for name, agree in report["tokens"].items():
        if agree["agreement"] < tol.min_token_agreement:
            violations.append(f"{name} tokens: identical prefix {agree['prefix']}/{agree['length']} "
                              f"< {tol.min_token_agreement:.0%}")
    padded = (report.get("padded_batch") or {}).get("logits")
    if padded and padded["max_abs"] > tol.logits_max_abs and padded["max_rel"] > tol.logits_max_rel:
        violations.append(f"padded batch: logits at real positions of padded rows: max abs {padded['max_abs']:.3g} "
                          f"> {tol.logits_max_abs:g} and max rel {padded['max_rel']:.3g} > {tol.logits_max_rel:g}")
    if report["waveform_snr_db"] < tol.min_snr_db:
        violations.append(f"waveform SNR {report['waveform_snr_db']:.1f} dB < {tol.min_snr_db:g} dB")
    return violations


@torch.inference_mode()
def compare(baseline, candidate, processor, device: torch.device, tokens: int = 32, seed: int = 0) -> dict:
    """Fidelity measures of `candidate` against `baseline` (two loaded BarkModels)."""
    gen = torch.Generator().manual_seed(seed)
    # Teacher-forced inputs: a padded batch of text tokens for semantic, acoustic tokens for the others.
    sem_ids = torch.randint(0, 10_000, (2, 48), generator=gen)
    sem_mask = torch.ones_like(sem_ids)
    sem_mask[1, :12] = 0  # left padding in the second row
    coarse_ids = torch.randint(10_000, 12_048, (2, 96), generator=gen)
    fine_codes = torch.randint(0, 1024, (1, 1024, 8), generator=gen)
    logits = {}
    for name, run in {
        "semantic": lambda m: m.semantic(input_ids=sem_ids.to(device), attention_mask=sem_mask.to(device)).logits,
        "coarse": lambda m: m.coarse_acoustics(input_ids=coarse_ids.to(device)).logits,
        "fine": lambda m: m.fine_acoustics(2, fine_codes.to(device)).logits,
    }.items():
        ref, cand = run(baseline), run(candidate)
        if name == "semantic":  # padded query rows carry no meaning; compare real positions
            ref, cand = ref[sem_mask.bool().to(device)], cand[sem_mask.bool().to(device)]
        logits[name] = logits_error(ref, cand)

    # Greedy decoding through the models' own generate (the same code path as a benchmark call).
    from transformers.models.bark.generation_configuration_bark import (
        BarkCoarseGenerationConfig, BarkFineGenerationConfig, BarkSemanticGenerationConfig)

    gc = baseline.generation_config
    sem_cfg = BarkSemanticGenerationConfig(**gc.semantic_config)
    coarse_cfg = BarkCoarseGenerationConfig(**gc.coarse_acoustics_config)
    fine_cfg = BarkFineGenerationConfig(**gc.fine_acoustics_config)
    inputs = processor(["Let's try generating speech, with Bark, a text-to-speech model"], return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def semantic(m):
        return m.semantic.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   semantic_generation_config=sem_cfg, do_sample=False,
                                   max_new_tokens=tokens, min_new_tokens=tokens)

    def coarse(m, sem):
        return m.coarse_acoustics.generate(sem, semantic_generation_config=sem_cfg,
                                           coarse_generation_config=coarse_cfg, codebook_size=gc.codebook_size,
                                           do_sample=False)

    ref_sem, cand_sem = semantic(baseline), semantic(candidate)
    ref_coarse, cand_coarse = coarse(baseline, ref_sem), coarse(candidate, ref_sem)
    token_report = {"semantic": prefix_agreement(ref_sem, cand_sem),
                    "coarse": prefix_agreement(ref_coarse, cand_coarse)}

    fine = baseline.fine_acoustics.generate(ref_coarse, semantic_generation_config=sem_cfg,
                                            coarse_generation_config=coarse_cfg,
                                            fine_generation_config=fine_cfg, codebook_size=gc.codebook_size,
                                            temperature=None)
    ref_wave = baseline.codec_decode(fine)[0].float().cpu().numpy()
    cand_wave = candidate.codec_decode(fine)[0].float().cpu().numpy()
    return {"logits": logits, "tokens": token_report, "waveform_snr_db": snr_db(ref_wave, cand_wave),
            "padded_batch": padded_batch(baseline, candidate, processor, device, sem_cfg, tokens)}


def padded_batch(baseline, candidate, processor, device: torch.device, sem_cfg, tokens: int) -> dict:
    """The study's prompts as one batch of 8 (different lengths, so the shorter rows are padded):

    - teacher-forced semantic logits with the tokenizer's attention mask, left-padded as batched
      decoder-only generation pads: error and argmax agreement at the real positions of the padded rows
      (a mask-ignoring attention lets them attend to the padding);
    - the pipeline's own greedy semantic decoding of the batch (BarkModel.generate's path: the processor
      pads every prompt to 256 tokens and Bark replaces padding by its pad token, the mask never reaching
      the attention): identical prefix over all rows.
    """
    prompts = DEFAULT_PROMPTS[:PADDED_BATCH]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    ids = (enc["input_ids"] + sem_cfg.text_encoding_offset).to(device)
    mask = enc["attention_mask"].to(device)
    padded_rows = (mask == 0).any(dim=1)
    real = mask.bool() & padded_rows[:, None]
    ref = baseline.semantic(input_ids=ids, attention_mask=mask).logits[real]
    cand = candidate.semantic(input_ids=ids, attention_mask=mask).logits[real]
    inputs = processor(prompts, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def generate(m):
        return m.semantic.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   semantic_generation_config=sem_cfg, do_sample=False,
                                   max_new_tokens=tokens, min_new_tokens=tokens)

    return {"batch_size": len(prompts), "padded_rows": int(padded_rows.sum()),
            "padding": "left, to the longest prompt", "real_positions": int(real.sum()),
            "logits": logits_error(ref, cand),
            "token_agreement": float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
            "pipeline_semantic": prefix_agreement(generate(baseline), generate(candidate))}


def _load(source, variant: variants.Variant, device: torch.device):
    loaded = models.load(source, **variant.load_kwargs(device))
    if not variant.places_model:
        loaded.model.to(device)
    variant.apply(loaded.model, variants.Context(device=device))
    return loaded


def run_fidelity(model_id: str, variant_name: str, out: str, device_name: str = "auto",
                 offline_fallback: str | None = None, tokens: int = 32, baseline: str = "eager",
                 retry_of: str | None = None) -> dict:
    """Write the fidelity record of one variant against `baseline`; not applicable and failures are
    recorded, not raised."""
    _quiet_transformers()
    variant, base_variant = variants.parse(variant_name), variants.parse(baseline)
    device = provenance.resolve_device(device_name)
    tol = variant.tolerance
    report = {"schema_version": 2, "status": "ok", "reason": None, "variant": variant_name, "baseline": baseline,
              "model": {"requested": model_id}, "device": device.type, "hardware": provenance.hardware(device),
              "versions": provenance.versions(), "git_commit": provenance.git_commit(),
              "tokens_compared": tokens, "tolerance": {k: getattr(tol, k) for k in tol.__dataclass_fields__},
              "logits": None, "tokens": None, "waveform_snr_db": None, "padded_batch": None, "within_tolerance": None,
              "violations": [],
              "error": None, "retry_of": retry_of, "started_at": _now(), "finished_at": None}
    reason = variant.not_applicable_reason(device) or base_variant.not_applicable_reason(device)
    deadline = float(os.environ.get(DEADLINE_ENV) or "inf")  # the workflow's run budget
    if reason:
        report.update(status="not_applicable", reason=reason)
    elif time.time() > deadline:
        report.update(status="failed", reason="run budget exhausted before this job started")
    else:
        try:
            source = models.resolve(model_id, offline_fallback)
            report["model"].update(id=source.id, weights=source.weights)
            reference = _load(source, base_variant, device)
            candidate = _load(source, variant, device)
            report.update(compare(reference.model, candidate.model, reference.processor, device, tokens))
            report["violations"] = check(tol, report)
            report["within_tolerance"] = not report["violations"]
        except models.ModelSourceError:
            raise
        except Exception as exc:
            report.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500],
                          error=traceback.format_exc())
    report["finished_at"] = _now()
    FidelityResult.from_dict(report, out).save_json(out)
    return report
