"""Does an optimization keep the output? Two questions, answered apart.

Is the implementation right? The variant against the reference simulation of its number format applied to the
baseline (`barkbench.references`; the baseline itself for exact optimizations), with limits fixed in the registry
(`variants.ImplementationLimit`: the fp32 floor plus a share of the reference's own distance to the baseline,
and per simulated layer a share of its quantization error), never from the candidate. What does the format cost?
The reference's and the candidate's distance to the baseline (`format_cost`, llama.cpp's KL statistics), judged
only on hub weights against targets written before the run. The comparison itself has four parts (below,
"baseline" is what the candidate is compared with):

- teacher-forced distributions of the semantic and coarse models and of the fine model at EVERY
  codebook index (each index has its own lm_head, and its own graph under torch.compile): KL divergence
  of the candidate from the baseline (mean, 99th percentile, max), share of positions with the same
  top-1 token, max |Δp| of the baseline's top token, max logit error, and the baseline's top-1/top-2
  logit margins (the way llama.cpp judges quantized LLMs);
- free-running greedy decoding through the sub-models' own `generate` (semantic, then coarse from the
  baseline's semantic tokens). Until the first divergence both models see the same context, so the
  logits of each step are compared there. A divergence is a fault only where the baseline's margin is
  larger than twice the logit error the limit allows (fixed from the reference, never the candidate's own
  error); near ties, which random weights produce almost everywhere, are reported as not judged instead of
  failing or passing a variant by chance. Coarse generation runs in sliding windows and the fine model in
  windows of frames: every window's steps are judged;
- the end-to-end chain: the candidate's fine codes from the baseline's coarse tokens and the candidate's
  codec on them, against the baseline's chain (codes agreement, waveform SNR, fine decisions judged like
  free-running tokens); and, separately, the codec alone (baseline codes through the candidate's codec),
  n/a where the codec is bit-for-bit untouched;
- a batched check: a batch of prompts of different lengths (padded by the processor) through the
  semantic `generate` at bs > 1, each row against the baseline at bs 1 on the same prompt.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
import traceback
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from . import models, provenance, variants
from .jobwrap import (cannot_pay_off_in_this_run, failure_reason, job_time_limit, now, quiet_transformers, run_job,
                      use_threads)
from .records import FidelityResult
from .trackers import TimeLimit, TimeLimitExceeded

SCHEMA_VERSION = 3
SNR_CAP_DB = 200.0  # a bit-identical waveform has infinite SNR; JSON needs a number
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
            "logit_scale": ref.abs().max().item(), "margin": _quantiles(margins(ref))}


def kl_report(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """llama.cpp's KL-divergence statistics (`llama-perplexity --kl-divergence`) of (N, V) logits against the
    reference's: KL mean with its standard error, KL percentiles, percentiles of Δp (the candidate's probability of
    the reference's top token minus the reference's), RMS Δp, and the same-top-1 share with its binomial σ."""
    ref, cand = reference.double().reshape(-1, reference.shape[-1]), candidate.double().reshape(-1, candidate.shape[-1])
    logp, logq = F.log_softmax(ref, -1), F.log_softmax(cand, -1)
    kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).clamp_min(0.0)
    top = ref.argmax(-1, keepdim=True)
    dp = (logq.gather(-1, top).exp() - logp.gather(-1, top).exp()).flatten()
    n = kl.numel()
    same = (cand.argmax(-1, keepdim=True) == top).double().mean().item()
    levels = {"p1": 0.01, "p5": 0.05, "p10": 0.1, "median": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
    kl_q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.95, 0.99], dtype=kl.dtype)).tolist()
    dp_q = torch.quantile(dp, torch.tensor(list(levels.values()), dtype=dp.dtype)).tolist()
    return {"positions": n, "kl_mean": kl.mean().item(),
            "kl_mean_se": (kl.std().item() / math.sqrt(n)) if n > 1 else None,
            "kl": dict(zip(("median", "p90", "p95", "p99"), kl_q), max=kl.max().item()),
            "dp": dict(zip(levels, dp_q), rms=dp.pow(2).mean().sqrt().item()),
            "same_top1": same, "same_top1_sigma": math.sqrt(same * (1.0 - same) / n)}


def judge_path(ref_tokens, cand_tokens, ref_steps: torch.Tensor, cand_steps: torch.Tensor, bound: float) -> dict:
    """Free-running agreement of one row, judged by margins.

    `ref_steps`/`cand_steps`: (T, V) logits each model chose its T tokens from, -inf where a step could not pick
    a token (the same tokens in both). Up to the first divergence the contexts are identical, so the logits are
    compared there. `bound` is a fixed logit error (set from the reference, never from the candidate): a step
    whose baseline margin exceeds twice the bound cannot flip from an error within it, so a divergence there is a
    fault; a divergence at a smaller margin is a near tie and is not judged.
    """
    ref_tokens, cand_tokens = torch.as_tensor(ref_tokens).flatten().cpu(), torch.as_tensor(cand_tokens).flatten().cpu()
    length = int(ref_tokens.numel())
    n = min(length, int(cand_tokens.numel()))
    differ = (ref_tokens[:n] != cand_tokens[:n]).nonzero()
    prefix = int(differ[0].item()) if len(differ) else n
    m = margins(ref_steps)
    same_context = min(prefix + 1, n, len(ref_steps), len(cand_steps))  # steps decided on identical contexts
    ref_seen, cand_seen = ref_steps[:same_context].float(), cand_steps[:same_context].float()
    allowed = torch.isfinite(ref_seen)
    err = torch.where(allowed, ref_seen - cand_seen, torch.zeros(())).abs()
    decisive = m > 2.0 * bound
    diverged_at_decisive = prefix < n and bool(decisive[prefix])
    scale = ref_seen[allowed].abs().max().item() if same_context else 1.0
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


def _coarse_steps(calls, offset: int, codebook_size: int, n_codebooks: int) -> torch.Tensor:
    """(T, V - offset) logits of each coarse step over the tokens that step could pick, -inf elsewhere.

    Coarse generation runs in sliding windows, one `generate` each, whose first call sees the whole window
    (a prefill of several positions). In each window the codebooks alternate from the first step, and the
    logits processor (AlternatingCodebooksLogitsProcessor) masks the semantic vocabulary and the other codebooks'
    blocks, but not the tokens past the last codebook's block: those are choosable at the last codebook's steps
    (random weights pick them)."""
    rows, step = [], 0
    for _, _, logits in calls:
        step = 0 if logits.shape[1] > 1 else step + 1  # a prefill starts a window
        book = step % n_codebooks
        row = logits[0, -1, offset:].clone()
        start = book * codebook_size
        stop = start + codebook_size if book < n_codebooks - 1 else row.numel()
        row[:start], row[stop:] = -math.inf, -math.inf
        rows.append(row)
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


def fine_windows(frames: int, window: int, history: int) -> list[tuple[int, int]]:
    """The positions each outer loop of `BarkFineModel.generate` decides, relative to its input buffer, as
    (start, stop): one window of `window` frames (padded when shorter), then windows that move by `history`
    frames and decide the frames after the ones they keep as context (no speaker history prompt)."""
    length = max(frames, window)
    loops = max(0, math.ceil((frames - window) / history)) + 1
    out = []
    for n in range(loops):
        start = min(n * history, length - window)
        fill = min(n * history, length - history)
        out.append((fill - start, min(window, frames - start)))
    return out


def _judge_fine_calls(ref_calls, cand_calls, frames: int, codebook_size: int, bounds: dict, windows) -> dict:
    """The fine model's decisions in generate (one call per codebook and window): judged while the two
    models' inputs are identical, at the positions the call decides whose baseline margin exceeds twice the
    fixed logit bound of that codebook."""
    judged, mismatches, decisive, total, max_abs, scale = 0, 0, 0, 0, 0.0, 0.0
    per_window = len(ref_calls) // max(1, len(windows))
    for i, ((idx, ref_in, ref_logits), (cidx, cand_in, cand_logits)) in enumerate(zip(ref_calls, cand_calls)):
        if idx != cidx or not all(torch.equal(x, y) for x, y in zip(ref_in, cand_in)):
            break  # an earlier decision differed: contexts differ from here on
        start, stop = windows[min(i // max(1, per_window), len(windows) - 1)]
        r, c = ref_logits[0, start:stop, :codebook_size], cand_logits[0, start:stop, :codebook_size]
        m = margins(r)
        is_decisive = m > 2.0 * bounds[f"fine[{idx}]"]
        judged += 1
        decisive += int(is_decisive.sum())
        total += int(m.numel())
        mismatches += int(((r.argmax(-1) != c.argmax(-1)) & is_decisive).sum())
        max_abs = max(max_abs, (r - c).abs().max().item())
        scale = max(scale, r.abs().max().item())
    return {"calls": len(ref_calls), "windows": len(windows), "judged_calls": judged,
            "decisive_share": decisive / max(1, total), "decisive_mismatches": mismatches,
            "same_context_max_abs": max_abs, "same_context_max_rel": max_abs / (scale or 1.0)}


@torch.inference_mode()
def teacher_forced_logits(model, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """(N, V) logits of every sub-model (and every fine codebook index) on random inputs drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.generation_config
    sem_ids = torch.randint(0, 10_000, (2, 48), generator=gen)
    sem_mask = torch.ones_like(sem_ids)
    sem_mask[1, :12] = 0  # left padding in the second row: only a causal model's mask makes it harmless
    coarse_ids = torch.randint(10_000, 12_048, (2, 96), generator=gen)
    # generate's window length, so a compiled fine model is checked on the very graphs generate runs
    frames = cfg.fine_acoustics_config["max_fine_input_length"]
    fine_codes = torch.randint(0, cfg.codebook_size, (1, frames, cfg.fine_acoustics_config["n_fine_codebooks"]),
                               generator=gen)
    real = sem_mask.bool().to(device)
    out = {"semantic": model.semantic(input_ids=sem_ids.to(device), attention_mask=sem_mask.to(device)).logits[real],
           "coarse": model.coarse_acoustics(input_ids=coarse_ids.to(device)).logits}
    # every codebook index the fine generate predicts (the coarse model gives the first ones)
    for idx in range(cfg.coarse_acoustics_config["n_coarse_codebooks"], cfg.fine_acoustics_config["n_fine_codebooks"]):
        out[f"fine[{idx}]"] = model.fine_acoustics(idx, fine_codes.to(device)).logits[..., :cfg.codebook_size]
    return {name: logits.float().cpu() for name, logits in out.items()}


def teacher_forced(baseline, candidate, device: torch.device, seed: int = 0) -> dict:
    """Distribution stats of every sub-model (and every fine codebook index) on the same random inputs."""
    ref, cand = teacher_forced_logits(baseline, device, seed), teacher_forced_logits(candidate, device, seed)
    return {name: distribution_stats(ref[name], cand[name]) for name in ref}


CODEC_CODES_SEED = 0


@torch.inference_mode()
def codec_snr(baseline, candidate) -> float | None:
    """SNR of the candidate's codec against the baseline's on the same 2 s of random codes (None: untouched)."""
    if codec_untouched(baseline, candidate):
        return None
    codes = torch.randint(0, baseline.generation_config.codebook_size, (1, 8, 150),
                          generator=torch.Generator().manual_seed(CODEC_CODES_SEED))
    return snr_db(decode(baseline, codes.to(baseline.device)), decode(candidate, codes.to(candidate.device)))


def _generation_configs(gc):
    from transformers.models.bark.generation_configuration_bark import (
        BarkCoarseGenerationConfig, BarkFineGenerationConfig, BarkSemanticGenerationConfig)

    return (BarkSemanticGenerationConfig(**gc.semantic_config),
            BarkCoarseGenerationConfig(**gc.coarse_acoustics_config),
            BarkFineGenerationConfig(**gc.fine_acoustics_config))


def _semantic(m, gc, processor, device, prompts, n):
    """Greedy semantic tokens of `prompts` and the (batch, T, vocab) logits each step chose from."""
    sem_cfg, _, _ = _generation_configs(gc)
    inputs = {k: v.to(device) for k, v in processor(list(prompts), return_tensors="pt").items()}
    with StepRecorder(m.semantic) as rec:
        out = m.semantic.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  semantic_generation_config=sem_cfg, do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n)
    if len(rec.calls) != n:  # a step that bypassed the forward would leave fewer steps to compare, silently
        raise RuntimeError(f"the semantic model's forward ran {len(rec.calls)} times for {n} tokens: the check "
                           "records one call per token")
    return out, _semantic_steps(rec.calls, sem_cfg.semantic_vocab_size)


def _coarse(m, gc, sem):
    sem_cfg, coarse_cfg, _ = _generation_configs(gc)
    with StepRecorder(m.coarse_acoustics) as rec:
        out = m.coarse_acoustics.generate(sem, semantic_generation_config=sem_cfg, coarse_generation_config=coarse_cfg,
                                          codebook_size=gc.codebook_size, do_sample=False)
    return out, rec.calls


def _fine(m, gc, coarse_tokens):
    sem_cfg, coarse_cfg, fine_cfg = _generation_configs(gc)
    with StepRecorder(m.fine_acoustics, keep_inputs=True) as rec:
        out = m.fine_acoustics.generate(coarse_tokens, semantic_generation_config=sem_cfg,
                                        coarse_generation_config=coarse_cfg, fine_generation_config=fine_cfg,
                                        codebook_size=gc.codebook_size, temperature=None)
    return out, rec.calls


def _once(memo: dict, key, compute):
    """The baseline's side of a measure: computed once per memo."""
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def logit_bounds(limits, stats: dict) -> dict:
    """The logit error each stage's limit allows, in logits: its share of the baseline's largest |logit|."""
    return {name: limit_for(limits, name).logits_max_rel * s["logit_scale"] for name, s in stats.items()}


@torch.inference_mode()
def chain(baseline, candidate, processor, device: torch.device, tokens: int, bound: dict,
          memo: dict | None = None) -> dict:
    """The end-to-end chain: the candidate's fine codes from the baseline's coarse tokens (greedy semantic of the
    first prompt, then coarse) and the candidate's codec on them, against the baseline's chain. `bound`: the
    allowed logit error per stage (`logit_bounds`); `memo`: the baseline's side, as in `compare`."""
    memo = {} if memo is None else memo
    gc = baseline.generation_config
    _, coarse_cfg, fine_cfg = _generation_configs(gc)
    ref_sem, _ = _once(memo, ("semantic", tokens),
                       lambda: _semantic(baseline, gc, processor, device, PROMPTS[:1], tokens))
    ref_coarse, _ = _once(memo, ("coarse", tokens), lambda: _coarse(baseline, gc, ref_sem))
    ref_fine, ref_fine_calls = _once(memo, ("fine", tokens), lambda: _fine(baseline, gc, ref_coarse))
    cand_fine, cand_fine_calls = _fine(candidate, gc, ref_coarse)
    n_coarse = coarse_cfg.n_coarse_codebooks
    same = (ref_fine == cand_fine)[0, n_coarse:].cpu()  # (codebooks, frames); the coarse codebooks are copied
    ref_wave = _once(memo, ("wave", tokens), lambda: decode(baseline, ref_fine))
    return {"codes_agreement": same.float().mean().item(),
            "codes_agreement_per_codebook": {f"fine[{n_coarse + i}]": row.float().mean().item()
                                             for i, row in enumerate(same)},
            "fine_decisions": _judge_fine_calls(
                ref_fine_calls, cand_fine_calls, ref_fine.shape[-1], gc.codebook_size, bound,
                fine_windows(ref_fine.shape[-1], fine_cfg.max_fine_input_length, fine_cfg.max_fine_history_length)),
            "waveform_snr_db": snr_db(ref_wave, decode(candidate, cand_fine))}


@torch.inference_mode()
def compare(baseline, candidate, processor, device: torch.device, tokens: int = 32, seed: int = 0,
            limits: "variants.Tolerance | Mapping[str, variants.Tolerance]" = variants.FLOAT_ROUNDING,
            memo: dict | None = None, candidate_tf: dict | None = None) -> dict:
    """Fidelity measures of `candidate` against `baseline` (two loaded BarkModels; the baseline is the reference
    simulation of the candidate's formats where it has lossy ones). A free-running step is decisive where the
    baseline's margin exceeds twice the logit error `limits` allow there (fixed before the candidate is seen).
    `memo`: the baseline's side kept across calls with the same baseline, inputs and tokens (the fault suite
    judges several candidates against one reference; its teacher-forced logits may be put there beforehand).
    `candidate_tf`: the candidate's `teacher_forced_logits` at `seed`, when already computed."""
    memo = {} if memo is None else memo
    ref_tf = _once(memo, ("teacher_forced", seed), lambda: teacher_forced_logits(baseline, device, seed))
    cand_tf = candidate_tf if candidate_tf is not None else teacher_forced_logits(candidate, device, seed)
    tf = {name: distribution_stats(ref_tf[name], cand_tf[name]) for name in ref_tf}
    bound = logit_bounds(limits, tf)

    gc = baseline.generation_config
    sem_cfg, coarse_cfg, _ = _generation_configs(gc)
    vocab = sem_cfg.semantic_vocab_size

    # free-running semantic, then coarse from the baseline's semantic tokens
    ref_sem, ref_sem_steps = _once(memo, ("semantic", tokens),
                                   lambda: _semantic(baseline, gc, processor, device, PROMPTS[:1], tokens))
    cand_sem, cand_sem_steps = _semantic(candidate, gc, processor, device, PROMPTS[:1], tokens)
    ref_coarse, ref_coarse_calls = _once(memo, ("coarse", tokens), lambda: _coarse(baseline, gc, ref_sem))
    cand_coarse, cand_coarse_calls = _coarse(candidate, gc, ref_sem)
    free = {"semantic": judge_path(ref_sem, cand_sem, ref_sem_steps[0], cand_sem_steps[0], bound["semantic"]),
            "coarse": judge_path(ref_coarse, cand_coarse,
                                 _coarse_steps(ref_coarse_calls, vocab, gc.codebook_size, coarse_cfg.n_coarse_codebooks),
                                 _coarse_steps(cand_coarse_calls, vocab, gc.codebook_size, coarse_cfg.n_coarse_codebooks),
                                 bound["coarse"])}

    # end-to-end chain from the same (baseline) coarse tokens
    chained = chain(baseline, candidate, processor, device, tokens, bound, memo)
    untouched = codec_untouched(baseline, candidate)
    ref_fine, ref_wave = memo[("fine", tokens)][0], memo[("wave", tokens)]
    codec = {"untouched": untouched, "snr_db": None if untouched else snr_db(ref_wave, decode(candidate, ref_fine))}

    # batched: a padded batch through the candidate's generate, row by row against the baseline at bs 1
    cand_batch, cand_batch_steps = _semantic(candidate, gc, processor, device, PROMPTS, BATCH_TOKENS)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        ref_row, ref_row_steps = _once(memo, ("row", i), lambda: _semantic(baseline, gc, processor, device, [prompt],
                                                                            BATCH_TOKENS))
        rows.append(judge_path(ref_row, cand_batch[i], ref_row_steps[0], cand_batch_steps[i], bound["semantic"]))
    return {"teacher_forced": tf, "free_running": free, "chain": chained, "codec": codec,
            "batched": {"batch_size": len(PROMPTS), "tokens": BATCH_TOKENS, "rows": rows},
            "padded_batch": padded_batch(baseline, candidate, processor, device, memo)}


PADDED_BATCH = 8  # the 2023 study's batch size


@torch.inference_mode()
def padded_batch(baseline, candidate, processor, device: torch.device, memo: dict | None = None) -> dict:
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
    memo = {} if memo is None else memo
    if "padded_batch" not in memo:  # the baseline's side, once per memo
        memo["padded_batch"] = baseline.semantic(input_ids=ids, attention_mask=mask).logits[real].cpu()
    logits = [memo["padded_batch"], candidate.semantic(input_ids=ids, attention_mask=mask).logits[real].cpu()]
    return {"batch_size": len(prompts), "padded_rows": int(padded_rows.sum()), "padding": "left, to the longest prompt",
            **distribution_stats(*logits)}


def limit_for(limits: "variants.Tolerance | Mapping[str, variants.Tolerance]", where: str) -> variants.Tolerance:
    """The limit of one stage (`semantic`, `coarse`, `fine[i]`, `codec`): one Tolerance for all, or one per stage
    (the fine chain is held to its loosest codebook)."""
    if isinstance(limits, variants.Tolerance):
        return limits
    if where in limits:
        return limits[where]
    fine = [t for k, t in limits.items() if k.startswith("fine[")]
    return max(fine, key=lambda t: t.logits_max_rel)


def _logits_violation(where: str, max_abs: float, max_rel: float, tol: variants.Tolerance) -> list[str]:
    if max_rel > tol.logits_max_rel:
        return [f"{where}: max logit error {max_rel:.3g} of the largest |logit| > {tol.logits_max_rel:.3g} "
                f"(absolute {max_abs:.3g})"]
    return []


def _path_violations(where: str, path: dict, tol: variants.Tolerance) -> list[str]:
    out = _logits_violation(f"{where} (same context)", path["same_context_max_abs"], path["same_context_max_rel"], tol)
    if path["decisive_mismatches"]:
        out.append(f"{where}: diverged at step {path['prefix']} where the baseline's margin "
                   f"{path['divergence_margin']:.3g} > 2 × the allowed logit error {path['error_bound']:.3g}")
    return out


def _top1_violation(where: str, s: dict, tol: variants.Tolerance) -> list[str]:
    # one flip is allowed beyond the floor: a near tie can flip under any legitimate rounding
    allowed = (1.0 - tol.min_same_top1) * s["positions"] + 1
    flips = round((1.0 - s["same_top1"]) * s["positions"])
    if flips > allowed:
        return [f"{where} same top-1 {s['same_top1']:.4f} < {tol.min_same_top1:.4f} ({flips} of {s['positions']} "
                f"positions differ, {allowed:.1f} allowed)"]
    return []


def check(limits: "variants.Tolerance | Mapping[str, variants.Tolerance]", report: dict) -> list[str]:
    """Every way `report` falls outside the limits, in words (empty: within)."""
    violations = []
    for name, s in report["teacher_forced"].items():
        tol = limit_for(limits, name)
        if s["kl_mean"] > tol.kl_mean:
            violations.append(f"{name} KL mean {s['kl_mean']:.3g} > {tol.kl_mean:.3g}")
        if s["kl_p99"] > tol.kl_p99:
            violations.append(f"{name} KL p99 {s['kl_p99']:.3g} > {tol.kl_p99:.3g}")
        if s["max_dp_top"] > tol.max_dp_top:
            violations.append(f"{name} max |Δp| of top token {s['max_dp_top']:.3g} > {tol.max_dp_top:.3g}")
        violations += _logits_violation(f"{name} logits", s["max_abs"], s["max_rel"], tol)
        violations += _top1_violation(name, s, tol)
    for name, path in report["free_running"].items():
        violations += _path_violations(f"{name} tokens", path, limit_for(limits, name))
    fd = report["chain"]["fine_decisions"]
    fine_tol = limit_for(limits, "fine")
    violations += _logits_violation("chain fine (same context)", fd["same_context_max_abs"], fd["same_context_max_rel"],
                                    fine_tol)
    if fd["decisive_mismatches"]:
        violations.append(f"chain fine codes: {fd['decisive_mismatches']} differ where the baseline's margin "
                          f"exceeds 2 × the allowed logit error")
    snr = report["codec"]["snr_db"]
    codec_tol = limit_for(limits, "codec") if isinstance(limits, variants.Tolerance) or "codec" in limits else None
    if snr is not None and codec_tol is not None and snr < codec_tol.min_snr_db:
        violations.append(f"codec SNR (same codes) {snr:.1f} dB < {codec_tol.min_snr_db:.3g} dB")
    sem_tol = limit_for(limits, "semantic")
    for i, row in enumerate(report["batched"]["rows"]):
        violations += _path_violations(f"batched row {i}", row, sem_tol)
    padded = report.get("padded_batch")
    if padded:
        violations += _logits_violation("padded batch: logits at real positions of padded rows", padded["max_abs"],
                                        padded["max_rel"], sem_tol)
        if padded["kl_mean"] > sem_tol.kl_mean:
            violations.append(f"padded batch: KL mean {padded['kl_mean']:.3g} > {sem_tol.kl_mean:.3g}")
    for layer in (report.get("layers") or {}).get("outside", []):
        violations.append(f"layer {layer['name']}: output error {layer['error']:.3g} > limit {layer['limit']:.3g} "
                          f"({layer['ratio']:.2f} of it; the layer's own quantization error {layer['format_error']:.3g})")
    return violations


class LayerInputs:
    """While the candidate runs, the first input and output of each of its layers that the reference simulates
    (`references.FakeQuantLinear`), by name: `layers` judges them, so one teacher-forced pass of the candidate
    serves both its distribution stats and its per-layer check."""

    def __init__(self, reference, candidate, only=None):
        from .int8_compile import CompilableDynamicLinear
        from .references import FakeQuantLinear

        self.candidate, self.seen, self._hooks = candidate, {}, []
        self.names = [name for name, m in reference.named_modules() if isinstance(m, FakeQuantLinear)
                      and (only is None or name in only)]
        self.kernels = runtime_kernels(candidate) if only is None else {}
        self._layers = []
        for name in self.names:
            if name in self.kernels:  # another runtime computes it: no PyTorch layer of that name runs
                continue
            layer = candidate.get_submodule(name)
            # int8 under compile: the layer that computes is called inside an opaque operator, with its hooks
            self._layers.append((name, layer.linear if isinstance(layer, CompilableDynamicLinear) else layer))

    def __enter__(self):
        for name, layer in self._layers:
            def hook(module, args, output, name=name):
                if name not in self.seen:  # later ops may reuse the buffers
                    self.seen[name] = (args[0].detach().clone(), output.detach().clone())
            self._hooks.append(layer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@torch.inference_mode()
def judge_layers(baseline, reference, seen: dict, limit: variants.ImplementationLimit,
                 floor: variants.Tolerance = variants.FLOAT_ROUNDING) -> dict | None:
    """Each simulated layer on the very input the candidate's layer of the same name received (`LayerInputs.seen`):
    the candidate's output against the reference layer's and the baseline layer's. Limit: the fp32 floor of the
    output's scale plus `layer_share` times the layer's own quantization error on that input."""
    rows = []
    for name, (x, out) in seen.items():
        ref_out = reference.get_submodule(name)(x).float()
        base_out = baseline.get_submodule(name)(x.to(baseline.get_submodule(name).weight.dtype)).float()
        format_error = (ref_out - base_out).abs().max().item()
        bound = floor.logits_max_rel * base_out.abs().max().item() + limit.layer_share * format_error
        error = (out.float() - ref_out).abs().max().item()
        rows.append({"name": name, "error": error, "format_error": format_error, "limit": bound,
                     "ratio": error / bound if bound else (0.0 if error == 0 else math.inf)})
    rows.sort(key=lambda r: -r["ratio"])
    return {"layers": len(rows), "layer_share": limit.layer_share, "max_ratio": rows[0]["ratio"] if rows else 0.0,
            "worst": rows[:5], "outside": [r for r in rows if r["ratio"] > 1.0][:10]}


def runtime_kernels(candidate) -> dict:
    """Layers another runtime computes (`ort_int8.LayerKernels`: a sub-model's `layer_kernels`), by qualified name."""
    out = {}
    for prefix in ("semantic", "coarse_acoustics", "fine_acoustics"):
        for name, kernel in (getattr(getattr(candidate, prefix, None), "layer_kernels", None) or {}).items():
            out[f"{prefix}.{name}"] = kernel
    return out


def teacher_forced_with_layers(baseline, reference, candidate, device: torch.device,
                               limit: variants.ImplementationLimit, seed: int = 0) -> tuple[dict, dict | None]:
    """The candidate's teacher-forced logits and, from the same pass, its per-layer check (None where the reference
    simulates no layer: casts only, or exact). A layer another runtime computes inside its graph is judged on the
    input the reference's layer of that name receives, through that runtime's own kernel and weights."""
    with LayerInputs(reference, candidate) as captured:
        logits = teacher_forced_logits(candidate, device, seed)
    if kernels := {n: k for n, k in captured.kernels.items() if n in captured.names}:
        with LayerInputs(reference, reference, only=kernels) as inputs:
            teacher_forced_logits(reference, device, seed)
        captured.seen.update({name: (x, kernels[name](x)) for name, (x, _) in inputs.seen.items()})
    return logits, (judge_layers(baseline, reference, captured.seen, limit) if captured.names else None)


def layer_check(baseline, reference, candidate, device: torch.device, limit: variants.ImplementationLimit,
                seed: int = 0) -> dict | None:
    """The per-layer check alone (`teacher_forced_with_layers`)."""
    if not LayerInputs(reference, candidate).names:
        return None
    return teacher_forced_with_layers(baseline, reference, candidate, device, limit, seed)[1]


def stage_limits(limit: variants.ImplementationLimit, cost: dict, codec_cost_snr: float | None,
                 floor: variants.Tolerance = variants.FLOAT_ROUNDING) -> dict[str, variants.Tolerance]:
    """Per stage, the limits of a candidate against the reference simulation: the fp32 floor plus the share of the
    reference's own distance to the baseline (`cost`: teacher-forced distribution stats per stage)."""
    k = limit.model_share
    out = {}
    for name, c in cost.items():
        out[name] = variants.Tolerance(
            floor.logits_max_rel + k * c["max_rel"], floor.kl_mean + k * k * c["kl_mean"],
            floor.kl_p99 + k * k * c["kl_p99"], floor.max_dp_top + k * c["max_dp_top"], floor.min_snr_db,
            limit.calibration, max(0.0, 1.0 - k * (1.0 - c["same_top1"])))
    # SNR of the candidate against the reference: the format's own SNR minus 20 log10(share) (a share of its noise)
    snr = floor.min_snr_db if codec_cost_snr is None or k == 0 else min(floor.min_snr_db,
                                                                           codec_cost_snr - 20 * math.log10(k))
    out["codec"] = variants.Tolerance(floor.logits_max_rel, floor.kl_mean, floor.kl_p99, floor.max_dp_top, snr,
                                      limit.calibration)
    return out


def _load(source, variant: variants.Variant, device: torch.device):
    loaded = models.load(source, **variant.load_kwargs(device))
    if not variant.places_model:
        loaded.model.to(device)
    variant.apply(loaded.model, variants.Context(device=device))
    return loaded


SYNTHETIC_COST_REASON = ("synthetic weights: random weights give near-flat distributions with near ties everywhere, so "
                         "what a number format costs on them says nothing about what it costs the trained model")


def parse_cost_targets(text: str) -> dict:
    """Cost targets as JSON: {format: {"kl_mean": x, "same_top1": y, "source": "where the target comes from"}}; a
    target without its source, or for a format no reference simulates, is refused."""
    from .references import FORMATS

    targets = json.loads(text)
    if not isinstance(targets, dict):
        raise ValueError("cost targets: expected a JSON object of formats")
    for fmt, target in targets.items():
        if fmt not in FORMATS:
            raise ValueError(f"cost targets: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        measures = set(target) - {"source"} if isinstance(target, dict) else set()
        if not measures or not measures <= {"kl_mean", "same_top1"} or not target.get("source"):
            raise ValueError(f"cost targets for {fmt}: expected kl_mean and/or same_top1 with a source, got {target!r}")
    return targets


def format_cost(base_logits: dict, ref_logits: dict, cand_logits: dict, ref_snr, cand_snr, weights: str | None,
                formats: list[str], targets: dict | None) -> dict:
    """What the number format costs: the reference's and the candidate's distance to the baseline as measured
    (llama.cpp's KL statistics per sub-model and codebook, the codec's SNR on the same codes), with a verdict only
    on hub weights and only against targets written in the config before the run."""
    out = {"formats": formats,
           "reference": {k: kl_report(base_logits[k], ref_logits[k]) for k in base_logits},
           "candidate": {k: kl_report(base_logits[k], cand_logits[k]) for k in base_logits},
           "codec_snr_db": {"reference": ref_snr, "candidate": cand_snr},
           "targets": None, "within_targets": None, "verdict_reason": None, "misses": []}
    chosen = {f: (targets or {}).get(f) for f in formats if (targets or {}).get(f)}
    if weights != "hub":
        out["verdict_reason"] = SYNTHETIC_COST_REASON
    elif not chosen:
        out["verdict_reason"] = "no cost target for " + ", ".join(formats) + " in the config"
    else:
        out["targets"] = chosen
        for fmt, target in chosen.items():
            for stage, st in out["candidate"].items():
                if "kl_mean" in target and st["kl_mean"] > target["kl_mean"]:
                    out["misses"].append(f"{fmt}: {stage} KL mean {st['kl_mean']:.3g} > {target['kl_mean']:g} "
                                         f"({target.get('source', 'no source')})")
                if "same_top1" in target and st["same_top1"] < target["same_top1"]:
                    out["misses"].append(f"{fmt}: {stage} same top-1 {st['same_top1']:.4f} < {target['same_top1']:g} "
                                         f"({target.get('source', 'no source')})")
        out["within_targets"] = not out["misses"]
    return out


def limits_provenance(device: torch.device, weights: str | None) -> dict:
    """Where the limits were measured, and whether that is where they are now applied."""
    cal = variants.LIMITS_CALIBRATION
    warnings = []
    if device.type != cal["device"]:
        warnings.append(f"verdict on {device.type} with limits measured on {cal['device']}"
                        + (" (fused kernels and Triton reductions not calibrated)" if device.type == "cuda" else ""))
    if weights != cal["weights"]:
        warnings.append(f"verdict on {weights} weights with limits measured on {cal['weights']} weights")
    return {**cal, "applied_on": {"device": device.type, "weights": weights}, "warning": "; ".join(warnings) or None}


# Formats that change what generate computes, not the arithmetic (the fine window): their cost is measured on the
# chain, the reference's fine codes and audio against the baseline's from the same coarse tokens.
CHAIN_ONLY_FORMATS = ("fine-window",)


def run_fidelity(model_id: str, variant_name: str, out: str, device_name: str = "auto",
                 offline_fallback: str | None = None, tokens: int = 32, baseline: str = "eager",
                 retry_of: str | None = None, cost_targets: dict | None = None,
                 time_limit_s: float | None = None, threads: int | None = None) -> dict:
    """Write the fidelity record of one variant: against the reference simulation of its number formats (the
    baseline itself when it has none: is the implementation right?) and, for lossy formats, the format's cost
    against the baseline. Not applicable and failures are recorded, not raised. `time_limit_s` (and the
    workflow's run deadline): the check is stopped there and recorded as failed, naming the limit. `threads`: torch's
    (default: all physical cores, as a run has)."""
    quiet_transformers()
    use_threads(threads)
    variant, base_variant = variants.parse(variant_name), variants.parse(baseline)
    device = provenance.resolve_device(device_name)
    limit, formats = variant.limit, variant.reference_formats
    report = {"schema_version": SCHEMA_VERSION, "status": "ok", "reason": None, "variant": variant_name,
              "baseline": baseline, "model": {"requested": model_id}, "device": device.type,
              "hardware": provenance.hardware(device), "versions": provenance.versions(),
              "git_commit": provenance.git_commit(), "tokens_compared": tokens,
              "reference": {"formats": formats, "compared_with": "reference simulation" if formats else "baseline",
                            "model_share": limit.model_share, "layer_share": limit.layer_share,
                            "calibration": limit.calibration},
              "tolerance": None, "limits": None, "limits_measured": None, "layers": None, "format_cost": None,
              "teacher_forced": None, "free_running": None, "chain": None, "codec": None, "batched": None,
              "padded_batch": None,
              "within_tolerance": None, "violations": [], "error": None, "retry_of": retry_of,
              "started_at": now(), "finished_at": None}
    job = job_time_limit(time_limit_s or math.inf, time.time())  # and the workflow's run deadline

    def work():
        with TimeLimit(job.limit_s) if math.isfinite(job.limit_s) else contextlib.nullcontext():
            source = models.resolve(model_id, offline_fallback)
            report["model"].update(id=source.id, weights=source.weights)
            report["limits_measured"] = limits_provenance(device, source.weights)
            base = _load(source, base_variant, device)
            candidate = _load(source, variant, device)
            from .references import simulate

            reference = simulate(base.model, formats)
            memo, cand_tf = {}, None  # the reference's side and the candidate's teacher-forced logits, computed once
            if formats:
                base_tf, ref_tf = (teacher_forced_logits(m, device) for m in (base.model, reference))
                cand_tf, report["layers"] = teacher_forced_with_layers(base.model, reference, candidate.model, device,
                                                                       limit)
                memo[("teacher_forced", 0)] = ref_tf
                cost = {k: distribution_stats(base_tf[k], ref_tf[k]) for k in base_tf}
                ref_snr, cand_snr = codec_snr(base.model, reference), codec_snr(base.model, candidate.model)
                report["format_cost"] = format_cost(base_tf, ref_tf, cand_tf, ref_snr, cand_snr, source.weights,
                                                    formats, cost_targets)
                limits = stage_limits(limit, cost, ref_snr)
            else:
                limits = variants.FLOAT_ROUNDING
            report["limits"] = ({k: _tolerance_dict(t) for k, t in limits.items()} if isinstance(limits, dict)
                                else {"all": _tolerance_dict(limits)})
            report["tolerance"] = _tolerance_dict(_loosest(limits))
            # The check runs the candidate at several batch sizes and with a recorder around its forward: each is a
            # new graph for a compiled decode step (fullgraph, so the default limit of 8 would fail the check; on
            # bark-small over several coarse windows 64 did too, hence the limits of one frame and of all frames).
            with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
                report.update(compare(reference, candidate.model, base.processor, device, tokens, limits=limits,
                                      memo=memo, candidate_tf=cand_tf))
                if any(f in CHAIN_ONLY_FORMATS for f in formats):  # teacher-forced measures cannot see their cost
                    report["format_cost"]["chain"] = chain(base.model, reference, base.processor, device, tokens,
                                                           logit_bounds(limits, cost))
            report["violations"] = check(limits, report)
            report["within_tolerance"] = not report["violations"]

    def failure(exc: BaseException) -> dict:
        reason = f"time limit {job.limit_s:.0f} s reached" if isinstance(exc, TimeLimitExceeded) else failure_reason(exc)
        return {"reason": reason, "error": traceback.format_exc()}

    run_job(report, job, variant.not_applicable_reason(device) or base_variant.not_applicable_reason(device)
            or set_aside_in_this_run(variant, device, model_id), work, failure)
    if report["tolerance"] is None:
        report["tolerance"] = _tolerance_dict(variants.FLOAT_ROUNDING)
    FidelityResult.from_dict(report, out).save_json(out)
    return report


def set_aside_in_this_run(variant: variants.Variant, device: torch.device, model_id: str) -> str | None:
    """Why a workflow run does not check a variant that cannot pay off on this CPU (None: it checks it). The run's
    processes of such a variant stop after their warm-up call (`runner.cannot_pay_off_here`); its check would take
    several calls of it (emulated bf16 under an AVX2 ceiling: past a job's time limit). A check by hand still runs:
    it is the run's probe ($BARKBENCH_BASELINE_CALL_S) that marks a workflow run."""
    why = cannot_pay_off_in_this_run(variant, device, model_id)
    return None if why is None else (f"not checked in this run: {why}; its processes stop after their warm-up call "
                                     "(check it on a CPU where it pays off)")


def _tolerance_dict(tol: variants.Tolerance) -> dict:
    return {k: getattr(tol, k) for k in tol.__dataclass_fields__}


def _loosest(limits) -> variants.Tolerance:
    """The loosest bound of each measure over the stages (the record's one-line summary of its limits)."""
    if isinstance(limits, variants.Tolerance):
        return limits
    ts = list(limits.values())
    return variants.Tolerance(max(t.logits_max_rel for t in ts), max(t.kl_mean for t in ts),
                              max(t.kl_p99 for t in ts), max(t.max_dp_top for t in ts), min(t.min_snr_db for t in ts),
                              ts[0].note, min(t.min_same_top1 for t in ts))
