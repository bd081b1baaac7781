"""Does an optimization keep the output? A variant against the baseline variant (eager fp32 by default)
on the same inputs, in four parts:

- teacher-forced distributions of the semantic and coarse models and of the fine model at EVERY
  codebook index (each index has its own lm_head, and its own graph under torch.compile): KL divergence
  of the candidate from the baseline (mean, 99th percentile, max), share of positions with the same
  top-1 token, max |Δp| of the baseline's top token, max logit error, and the baseline's top-1/top-2
  logit margins (the way llama.cpp judges quantized LLMs);
- free-running greedy decoding through the sub-models' own `generate` (semantic, then coarse from the
  baseline's semantic tokens). Until the first divergence both models see the same context, so the
  logits of each step are compared there. A divergence is a fault only where the baseline's margin is
  larger than twice the candidate's teacher-forced max logit error (no logit moving by less than that
  error can flip such a step); near ties, which random weights produce almost everywhere, are reported
  as not judged instead of failing or passing a variant by chance;
- the end-to-end chain: the candidate's fine codes from the baseline's coarse tokens and the candidate's
  codec on them, against the baseline's chain (codes agreement, waveform SNR, fine decisions judged like
  free-running tokens); and, separately, the codec alone (baseline codes through the candidate's codec),
  n/a where the codec is bit-for-bit untouched;
- a batched check: a batch of prompts of different lengths (padded by the processor) through the
  semantic `generate` at bs > 1, each row against the baseline at bs 1 on the same prompt.

Tolerances are per optimization (`barkbench.variants`), derived from measured noise floors.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

from . import models, provenance, variants
from .protocol import DEADLINE_ENV
from .records import FidelityResult
from .runner import _now, _quiet_transformers
from .trackers import TimeLimit, TimeLimitExceeded

SCHEMA_VERSION = 3
SNR_CAP_DB = 200.0  # a bit-identical waveform has infinite SNR; JSON needs a number
SUB_MODELS = ("semantic", "coarse", "fine")
# Prompts of different lengths for the batched check; the first is also the free-running prompt.
PROMPTS = ("Let's try generating speech, with Bark, a text-to-speech model",
           "Hello.",
           "A somewhat longer prompt, so that the padding differs from row to row in the batch.")
BATCH_TOKENS = 8  # free-running tokens per row in the batched check (few: the check is about rows, not length)


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


def margins(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit of each row of (N, V) logits."""
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def _quantiles(x: torch.Tensor) -> dict:
    x = x.float().flatten()
    q = torch.quantile(x, torch.tensor([0.1, 0.5], dtype=x.dtype)).tolist()
    return {"p10": q[0], "median": q[1]}


def distribution_stats(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Teacher-forced comparison of (N, V) logits at the same N positions: KL(baseline || candidate) in nats,
    same top-1 share, max |Δp| of the baseline's top token, max logit error, and the baseline's margins."""
    # float64: in float32 the KL sum over a 10k vocabulary has a rounding floor (~1e-6) far above fp32 reordering's
    ref, cand = reference.double().reshape(-1, reference.shape[-1]), candidate.double().reshape(-1, candidate.shape[-1])
    logp, logq = F.log_softmax(ref, -1), F.log_softmax(cand, -1)
    kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).clamp_min(0.0)
    top = ref.argmax(-1, keepdim=True)
    dp = (logp.gather(-1, top).exp() - logq.gather(-1, top).exp()).abs()
    err = (ref - cand).abs().max().item()
    return {"positions": int(ref.shape[0]), "kl_mean": kl.mean().item(),
            "kl_p99": torch.quantile(kl, 0.99).item(), "kl_max": kl.max().item(),
            "same_top1": (cand.argmax(-1, keepdim=True) == top).float().mean().item(),
            "max_dp_top": dp.max().item(), "max_abs": err, "max_rel": err / (ref.abs().max().item() or 1.0),
            "margin": _quantiles(margins(ref))}


def judge_path(ref_tokens, cand_tokens, ref_steps: torch.Tensor, cand_steps: torch.Tensor, bound: float) -> dict:
    """Free-running agreement of one row, judged by margins.

    `ref_steps`/`cand_steps`: (T, V) logits each model chose its T tokens from (over the tokens the step
    could pick). Up to the first divergence the contexts are identical, so the logits are compared there.
    `bound` is the candidate's measured (teacher-forced) max logit error: a step whose baseline margin
    exceeds twice the bound cannot flip from that error, so a divergence there is a fault; a divergence at
    a smaller margin is a near tie and is not judged.
    """
    ref_tokens, cand_tokens = torch.as_tensor(ref_tokens).flatten().cpu(), torch.as_tensor(cand_tokens).flatten().cpu()
    length = int(ref_tokens.numel())
    n = min(length, int(cand_tokens.numel()))
    differ = (ref_tokens[:n] != cand_tokens[:n]).nonzero()
    prefix = int(differ[0].item()) if len(differ) else n
    m = margins(ref_steps)
    same_context = min(prefix + 1, n, len(ref_steps), len(cand_steps))  # steps decided on identical contexts
    err = (ref_steps[:same_context].float() - cand_steps[:same_context].float()).abs()
    decisive = m > 2.0 * bound
    diverged_at_decisive = prefix < n and bool(decisive[prefix])
    scale = ref_steps[:same_context].float().abs().max().item() if same_context else 1.0
    max_abs = err.max().item() if same_context else 0.0
    return {"prefix": prefix, "length": length, "agreement": prefix / max(1, length),
            "error_bound": bound, "decisive_share": decisive.float().mean().item() if len(m) else 0.0,
            "margin": _quantiles(m) if len(m) else None,
            "divergence_margin": m[prefix].item() if prefix < min(n, len(m)) else None,
            "decisive_mismatches": int(diverged_at_decisive),
            "same_context_max_abs": max_abs, "same_context_max_rel": max_abs / (scale or 1.0)}


class StepRecorder:
    """Records what a sub-model's `forward` returns during `generate` (one call per decoding step),
    wrapping the instance's forward (compiled or not) and restoring it afterwards."""

    def __init__(self, module, keep_inputs: bool = False):
        self.module, self.keep_inputs, self.calls = module, keep_inputs, []

    def __enter__(self):
        self._own = self.module.__dict__.get("forward")
        inner = self.module.forward

        @functools.wraps(inner)  # generate reads forward's signature (transformers 4.x validates kwargs with it)
        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            inputs = [a.detach().cpu().clone() for a in args if torch.is_tensor(a)] if self.keep_inputs else None
            self.calls.append((args[0] if args and not torch.is_tensor(args[0]) else None, inputs,
                               out.logits.detach().float().cpu()))
            return out

        self.module.forward = forward
        return self

    def __exit__(self, *exc):
        if self._own is None:
            del self.module.forward
        else:
            self.module.forward = self._own


def _semantic_steps(calls, vocab: int) -> torch.Tensor:
    """(batch, T, vocab) last-position logits of each step, over the semantic tokens a step can pick."""
    return torch.stack([logits[:, -1, :vocab] for _, _, logits in calls], 1)


def _coarse_steps(calls, ref_tokens: torch.Tensor, offset: int, codebook_size: int) -> torch.Tensor:
    """(T, codebook_size) logits of each coarse step over the codebook that step decodes (they alternate;
    the block is read from the baseline's token)."""
    rows = []
    for (_, _, logits), token in zip(calls, ref_tokens.flatten().tolist()):
        start = offset + ((token - offset) // codebook_size) * codebook_size
        rows.append(logits[0, -1, start:start + codebook_size])
    return torch.stack(rows)


def codec_untouched(baseline, candidate) -> bool:
    """True when the candidate's codec is the baseline's bit for bit: same module types, same tensors
    (values and dtypes), no replaced forward or codec_decode."""
    a, b = baseline.codec_model, candidate.codec_model
    # by name: weight-norm parametrization creates a class per module instance
    if [type(m).__qualname__ for m in a.modules()] != [type(m).__qualname__ for m in b.modules()]:
        return False
    if "codec_decode" in vars(candidate) or any("forward" in vars(m) for m in b.modules()):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


@torch.inference_mode()
def decode(model, codes) -> np.ndarray:
    """The first waveform `model.codec_decode` makes of `codes`, placed as `BarkModel.generate` places it: under
    CPU offload, accelerate's hooks move a sub-model to the accelerator only when its forward runs, and
    codec_decode never calls the codec's forward, so the codec is moved by hand and offloaded after."""
    if getattr(model, "fine_acoustics_hook", None) is not None:
        model.fine_acoustics_hook.offload()
        model.codec_model = model.codec_model.to(model.device)
    audio = model.codec_decode(codes)[0].float().cpu().numpy()
    if getattr(model, "codec_model_hook", None) is not None:
        model.codec_model_hook.offload()
    return audio


def _judge_fine_calls(ref_calls, cand_calls, frames: int, codebook_size: int, bounds: dict) -> dict:
    """The fine model's decisions in generate (one call per codebook and window): judged while the two
    models' inputs are identical, at positions whose baseline margin exceeds twice the measured error."""
    judged, mismatches, decisive, total, max_abs, scale = 0, 0, 0, 0, 0.0, 0.0
    for (idx, ref_in, ref_logits), (cidx, cand_in, cand_logits) in zip(ref_calls, cand_calls):
        if idx != cidx or not all(torch.equal(x, y) for x, y in zip(ref_in, cand_in)):
            break  # an earlier decision differed: contexts differ from here on
        r, c = ref_logits[0, :frames, :codebook_size], cand_logits[0, :frames, :codebook_size]
        m = margins(r)
        is_decisive = m > 2.0 * bounds[f"fine[{idx}]"]
        judged += 1
        decisive += int(is_decisive.sum())
        total += int(m.numel())
        mismatches += int(((r.argmax(-1) != c.argmax(-1)) & is_decisive).sum())
        max_abs = max(max_abs, (r - c).abs().max().item())
        scale = max(scale, r.abs().max().item())
    return {"calls": len(ref_calls), "judged_calls": judged, "decisive_share": decisive / max(1, total),
            "decisive_mismatches": mismatches, "same_context_max_abs": max_abs,
            "same_context_max_rel": max_abs / (scale or 1.0)}


@torch.inference_mode()
def teacher_forced(baseline, candidate, device: torch.device, seed: int = 0) -> dict:
    """Distribution stats of every sub-model (and every fine codebook index) on the same random inputs."""
    gen = torch.Generator().manual_seed(seed)
    cfg = baseline.generation_config
    sem_ids = torch.randint(0, 10_000, (2, 48), generator=gen)
    sem_mask = torch.ones_like(sem_ids)
    sem_mask[1, :12] = 0  # left padding in the second row: only a causal model's mask makes it harmless
    coarse_ids = torch.randint(10_000, 12_048, (2, 96), generator=gen)
    # generate's window length, so a compiled fine model is checked on the very graphs generate runs
    frames = cfg.fine_acoustics_config["max_fine_input_length"]
    fine_codes = torch.randint(0, cfg.codebook_size, (1, frames, cfg.fine_acoustics_config["n_fine_codebooks"]),
                               generator=gen)
    real = sem_mask.bool().to(device)
    runs = {"semantic": lambda m: m.semantic(input_ids=sem_ids.to(device), attention_mask=sem_mask.to(device)).logits[real],
            "coarse": lambda m: m.coarse_acoustics(input_ids=coarse_ids.to(device)).logits}
    # every codebook index the fine generate predicts (the coarse model gives the first ones)
    for idx in range(cfg.coarse_acoustics_config["n_coarse_codebooks"], cfg.fine_acoustics_config["n_fine_codebooks"]):
        runs[f"fine[{idx}]"] = (lambda i: lambda m: m.fine_acoustics(i, fine_codes.to(device)).logits[..., :cfg.codebook_size])(idx)
    return {name: distribution_stats(run(baseline).cpu(), run(candidate).cpu()) for name, run in runs.items()}


@torch.inference_mode()
def compare(baseline, candidate, processor, device: torch.device, tokens: int = 32, seed: int = 0) -> dict:
    """Fidelity measures of `candidate` against `baseline` (two loaded BarkModels)."""
    from transformers.models.bark.generation_configuration_bark import (
        BarkCoarseGenerationConfig, BarkFineGenerationConfig, BarkSemanticGenerationConfig)

    tf = teacher_forced(baseline, candidate, device, seed)
    bound = {name: s["max_abs"] for name, s in tf.items()}

    gc = baseline.generation_config
    sem_cfg = BarkSemanticGenerationConfig(**gc.semantic_config)
    coarse_cfg = BarkCoarseGenerationConfig(**gc.coarse_acoustics_config)
    fine_cfg = BarkFineGenerationConfig(**gc.fine_acoustics_config)
    vocab = sem_cfg.semantic_vocab_size

    def semantic(m, prompts, n):
        inputs = {k: v.to(device) for k, v in processor(list(prompts), return_tensors="pt").items()}
        with StepRecorder(m.semantic) as rec:
            out = m.semantic.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      semantic_generation_config=sem_cfg, do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n)
        return out, _semantic_steps(rec.calls, vocab)

    def coarse(m, sem):
        with StepRecorder(m.coarse_acoustics) as rec:
            out = m.coarse_acoustics.generate(sem, semantic_generation_config=sem_cfg,
                                              coarse_generation_config=coarse_cfg,
                                              codebook_size=gc.codebook_size, do_sample=False)
        return out, rec.calls

    def fine(m, coarse_tokens):
        with StepRecorder(m.fine_acoustics, keep_inputs=True) as rec:
            out = m.fine_acoustics.generate(coarse_tokens, semantic_generation_config=sem_cfg,
                                            coarse_generation_config=coarse_cfg,
                                            fine_generation_config=fine_cfg, codebook_size=gc.codebook_size,
                                            temperature=None)
        return out, rec.calls

    # free-running semantic, then coarse from the baseline's semantic tokens
    ref_sem, ref_sem_steps = semantic(baseline, PROMPTS[:1], tokens)
    cand_sem, cand_sem_steps = semantic(candidate, PROMPTS[:1], tokens)
    ref_coarse, ref_coarse_calls = coarse(baseline, ref_sem)
    cand_coarse, cand_coarse_calls = coarse(candidate, ref_sem)
    free = {"semantic": judge_path(ref_sem, cand_sem, ref_sem_steps[0], cand_sem_steps[0], bound["semantic"]),
            "coarse": judge_path(ref_coarse, cand_coarse,
                                 _coarse_steps(ref_coarse_calls, ref_coarse, vocab, gc.codebook_size),
                                 _coarse_steps(cand_coarse_calls, ref_coarse, vocab, gc.codebook_size),
                                 bound["coarse"])}

    # end-to-end chain from the same (baseline) coarse tokens
    ref_fine, ref_fine_calls = fine(baseline, ref_coarse)
    cand_fine, cand_fine_calls = fine(candidate, ref_coarse)
    n_coarse = coarse_cfg.n_coarse_codebooks
    same = (ref_fine == cand_fine)[0, n_coarse:].cpu()  # (codebooks, frames); the coarse codebooks are copied
    ref_wave = decode(baseline, ref_fine)
    chain = {"codes_agreement": same.float().mean().item(),
             "codes_agreement_per_codebook": {f"fine[{n_coarse + i}]": row.float().mean().item()
                                              for i, row in enumerate(same)},
             "fine_decisions": _judge_fine_calls(ref_fine_calls, cand_fine_calls, ref_fine.shape[-1],
                                                 gc.codebook_size, bound),
             "waveform_snr_db": snr_db(ref_wave, decode(candidate, cand_fine))}
    untouched = codec_untouched(baseline, candidate)
    codec = {"untouched": untouched,
             "snr_db": None if untouched else snr_db(ref_wave, decode(candidate, ref_fine))}

    # batched: a padded batch through the candidate's generate, row by row against the baseline at bs 1
    cand_batch, cand_batch_steps = semantic(candidate, PROMPTS, BATCH_TOKENS)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        ref_row, ref_row_steps = semantic(baseline, [prompt], BATCH_TOKENS)
        rows.append(judge_path(ref_row, cand_batch[i], ref_row_steps[0], cand_batch_steps[i], bound["semantic"]))
    return {"teacher_forced": tf, "free_running": free, "chain": chain, "codec": codec,
            "batched": {"batch_size": len(PROMPTS), "tokens": BATCH_TOKENS, "rows": rows},
            "padded_batch": padded_batch(baseline, candidate, processor, device)}


PADDED_BATCH = 8  # the 2023 study's batch size


@torch.inference_mode()
def padded_batch(baseline, candidate, processor, device: torch.device) -> dict:
    """The study's prompts as one batch of 8, left-padded to the longest as batched decoder-only generation pads:
    teacher-forced semantic logits with the tokenizer's attention mask, compared at the real positions of the
    padded rows, where an attention that ignores the mask (optimum's 2023 BetterTransformer for Bark) lets real
    tokens attend to padding. (BarkModel.generate itself pads every prompt to 256 tokens with Bark's pad token
    and passes no mask to the attention: its own batches never show the bug.)"""
    from .protocol import DEFAULT_PROMPTS

    prompts = DEFAULT_PROMPTS[:PADDED_BATCH]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    ids = (enc["input_ids"] + baseline.generation_config.semantic_config["text_encoding_offset"]).to(device)
    mask = enc["attention_mask"].to(device)
    padded_rows = (mask == 0).any(dim=1)
    real = mask.bool() & padded_rows[:, None]
    logits = [m.semantic(input_ids=ids, attention_mask=mask).logits[real].cpu() for m in (baseline, candidate)]
    return {"batch_size": len(prompts), "padded_rows": int(padded_rows.sum()), "padding": "left, to the longest prompt",
            **distribution_stats(*logits)}


def _logits_violation(where: str, max_abs: float, max_rel: float, tol: variants.Tolerance) -> list[str]:
    if max_rel > tol.logits_max_rel:
        return [f"{where}: max logit error {max_rel:.3g} of the largest |logit| > {tol.logits_max_rel:g} "
                f"(absolute {max_abs:.3g})"]
    return []


def _path_violations(where: str, path: dict, tol: variants.Tolerance) -> list[str]:
    out = _logits_violation(f"{where} (same context)", path["same_context_max_abs"], path["same_context_max_rel"], tol)
    if path["decisive_mismatches"]:
        out.append(f"{where}: diverged at step {path['prefix']} where the baseline's margin "
                   f"{path['divergence_margin']:.3g} > 2 × measured error {path['error_bound']:.3g}")
    return out


def check(tol: variants.Tolerance, report: dict) -> list[str]:
    """Every way `report` falls outside the tolerance, in words (empty: within tolerance)."""
    violations = []
    for name, s in report["teacher_forced"].items():
        if s["kl_mean"] > tol.kl_mean:
            violations.append(f"{name} KL mean {s['kl_mean']:.3g} > {tol.kl_mean:g}")
        if s["kl_p99"] > tol.kl_p99:
            violations.append(f"{name} KL p99 {s['kl_p99']:.3g} > {tol.kl_p99:g}")
        if s["max_dp_top"] > tol.max_dp_top:
            violations.append(f"{name} max |Δp| of top token {s['max_dp_top']:.3g} > {tol.max_dp_top:g}")
        violations += _logits_violation(f"{name} logits", s["max_abs"], s["max_rel"], tol)
    for name, path in report["free_running"].items():
        violations += _path_violations(f"{name} tokens", path, tol)
    fd = report["chain"]["fine_decisions"]
    violations += _logits_violation("chain fine (same context)", fd["same_context_max_abs"], fd["same_context_max_rel"], tol)
    if fd["decisive_mismatches"]:
        violations.append(f"chain fine codes: {fd['decisive_mismatches']} differ where the baseline's margin "
                          f"exceeds 2 × measured error")
    snr = report["codec"]["snr_db"]
    if snr is not None and snr < tol.min_snr_db:
        violations.append(f"codec SNR (same codes) {snr:.1f} dB < {tol.min_snr_db:g} dB")
    for i, row in enumerate(report["batched"]["rows"]):
        violations += _path_violations(f"batched row {i}", row, tol)
    padded = report.get("padded_batch")
    if padded:
        violations += _logits_violation("padded batch: logits at real positions of padded rows", padded["max_abs"],
                                        padded["max_rel"], tol)
        if padded["kl_mean"] > tol.kl_mean:
            violations.append(f"padded batch: KL mean {padded['kl_mean']:.3g} > {tol.kl_mean:g}")
    return violations


def _load(source, variant: variants.Variant, device: torch.device):
    loaded = models.load(source, **variant.load_kwargs(device))
    if not variant.places_model:
        loaded.model.to(device)
    variant.apply(loaded.model, variants.Context(device=device))
    return loaded


def run_fidelity(model_id: str, variant_name: str, out: str, device_name: str = "auto",
                 offline_fallback: str | None = None, tokens: int = 32, baseline: str = "eager",
                 retry_of: str | None = None, time_limit_s: float | None = None) -> dict:
    """Write the fidelity record of one variant against `baseline`; not applicable and failures are
    recorded, not raised. `time_limit_s` (and the workflow's run deadline): the check is stopped there and
    recorded as failed, naming the limit."""
    _quiet_transformers()
    variant, base_variant = variants.parse(variant_name), variants.parse(baseline)
    device = provenance.resolve_device(device_name)
    tol = variant.tolerance
    report = {"schema_version": SCHEMA_VERSION, "status": "ok", "reason": None, "variant": variant_name,
              "baseline": baseline, "model": {"requested": model_id}, "device": device.type,
              "hardware": provenance.hardware(device), "versions": provenance.versions(),
              "git_commit": provenance.git_commit(), "tokens_compared": tokens,
              "tolerance": {k: getattr(tol, k) for k in tol.__dataclass_fields__},
              "teacher_forced": None, "free_running": None, "chain": None, "codec": None, "batched": None,
              "padded_batch": None,
              "within_tolerance": None, "violations": [], "error": None, "retry_of": retry_of,
              "started_at": _now(), "finished_at": None}
    reason = variant.not_applicable_reason(device) or base_variant.not_applicable_reason(device)
    deadline = float(os.environ.get(DEADLINE_ENV) or "inf")  # the workflow's run budget
    if reason:
        report.update(status="not_applicable", reason=reason)
    elif time.time() > deadline:
        report.update(status="failed", reason="run budget exhausted before this job started")
    else:
        limit = min(time_limit_s or math.inf, deadline - time.time())
        try:
            with TimeLimit(limit) if math.isfinite(limit) else contextlib.nullcontext():
                source = models.resolve(model_id, offline_fallback)
                report["model"].update(id=source.id, weights=source.weights)
                reference = _load(source, base_variant, device)
                candidate = _load(source, variant, device)
                # The check runs the candidate at several batch sizes and with a recorder around its forward: each is a
                # new graph for a compiled decode step (fullgraph, so the default limit of 8 would fail the check).
                with torch._dynamo.config.patch(recompile_limit=64):
                    report.update(compare(reference.model, candidate.model, reference.processor, device, tokens))
                report["violations"] = check(tol, report)
                report["within_tolerance"] = not report["violations"]
        except models.ModelSourceError:
            raise
        except TimeLimitExceeded:
            report.update(status="failed", reason=f"time limit {limit:.0f} s reached", error=traceback.format_exc())
        except Exception as exc:
            report.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500],
                          error=traceback.format_exc())
    report["finished_at"] = _now()
    FidelityResult.from_dict(report, out).save_json(out)
    return report
