"""Plausible implementation faults near the fidelity limits, and the correct variants beside them: each fault must
be caught and each correct variant pass, on the check's own prompts and inputs (seed 0), disjoint from the ones the
limits were calibrated on (seed 1). `python -m barkbench.faults [MODEL]` prints the separation: each one's largest
measure over its limit (below 1: within).

A fault is a registry variant, loaded as the check loads it, with one thing done wrong after loading; it is judged
exactly as `fidelity.run_fidelity` judges that variant (same reference simulation, same limits).
"""
from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import attention, fidelity, models, references, variants
from .jobwrap import cannot_pay_off_in_this_run, job_time_limit, now, positive_int, use_threads
from .records import FAULT_BUDGET_SPENT, FaultSuite

FAULTS_SCHEMA_VERSION = 1


def _quantized_linears(model):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear" and hasattr(m, "_packed_params")]


def int8_scale_off(model) -> None:
    """One quantized layer (the coarse model's first MLP input projection) dequantized with a weight scale 2 % off."""
    module = model.get_submodule("coarse_acoustics.layers.0.mlp.in_proj")
    inner, bias = module.forward, module.bias()

    def forward(x):
        out = inner(x)
        return out if bias is None else (out - bias) * 1.02 + bias

    module.forward = forward if bias is not None else (lambda x: inner(x) * 1.02)


def int8_per_channel(model) -> None:
    """Dynamic int8 with per-channel weight scales (torch.ao's per_channel_dynamic_qconfig) where torch.ao's default,
    and the variant's scheme, is one scale per tensor."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    for sub in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
        for name, module in list(sub.named_modules()):
            if type(module).__name__ == "Linear" and hasattr(module, "_packed_params"):
                w, b = module.weight().dequantize(), module.bias()
                plain = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
                with torch.no_grad():  # the float weights are gone: start again from the baseline's
                    plain.weight.copy_(_baseline_weights[f"{_prefix(model, sub)}.{name}.weight"])
                    if b is not None:
                        plain.bias.copy_(b)
                parent, _, attr = name.rpartition(".")
                setattr(sub.get_submodule(parent) if parent else sub, attr,
                        quantize_dynamic(torch.nn.Sequential(plain), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                         dtype=torch.qint8)[0])


_baseline_weights: dict = {}


def _prefix(model, sub) -> str:
    return next(n for n, m in model.named_children() if m is sub)


def int8_activation_twice(model) -> None:
    """Activations quantized twice: once on the full 0..255 range, again by the kernel on its 0..127 range."""
    for _, module in _quantized_linears(model):
        inner = module.forward
        module.forward = (lambda inner: lambda x: inner(references.fake_quant_activation(x, 255)))(inner)


class _SoftmaxBf16Accumulation(attention.BarkSelfAttention):
    """Eager attention whose softmax sums its exponentials in a bfloat16 accumulator, one key at a time, as a naive
    kernel without fp32 accumulation does. (Summing blocks of 16 in fp32 and only the block sums in bf16 lands at
    0.49 of the bf16 limit on synthetic:tiny, as far from the reference as a correct sdpa+bf16 at 0.48: at these
    lengths that error is the size of any legitimate bf16 reordering, and the check cannot tell them apart.)"""

    BLOCK = 1

    def _attn(self, query, key, value, attention_mask=None):
        w = torch.matmul(query, key.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if self.is_causal:
            q, k = query.size(-2), key.size(-2)
            w = w.masked_fill(self.bias[:, :, k - q:k, :k] == 0, torch.finfo(w.dtype).min)
        if attention_mask is not None:
            w = w + attention_mask
        e = torch.exp(w - w.amax(-1, keepdim=True))
        acc = torch.zeros(e.shape[:-1], dtype=e.dtype, device=e.device)
        for start in range(0, e.shape[-1], self.BLOCK):
            acc = (acc + e[..., start:start + self.BLOCK].sum(-1)).to(e.dtype)
        p = (e / acc.unsqueeze(-1)).to(value.dtype)
        return torch.matmul(p, value), p


def bf16_softmax_accumulation(model) -> None:
    for module in model.modules():
        if type(module) is attention.BarkSelfAttention:
            module.__class__ = _SoftmaxBf16Accumulation


class _PaddingOffByOne(attention.BarkSdpaAttention):
    """SDPA attention whose padding mask lets each query see one padded key more (the last pad before a left-
    padded row's first real token)."""

    def _attn(self, query, key, value, attention_mask=None, query_positions=None):
        if attention_mask is not None:
            attention_mask = torch.maximum(attention_mask, attention_mask.roll(-1, -1))
        return super()._attn(query, key, value, attention_mask, query_positions)


def sdpa_mask_off_by_one(model) -> None:
    for module in model.modules():
        if type(module) is attention.BarkSdpaAttention:
            module.__class__ = _PaddingOffByOne


def fine_head_in_bf16(model) -> None:
    """One op in the wrong precision: the fine model's lm_heads[3] (codebook index 4: the fine model has one head per
    codebook after the first) computed in bfloat16, as a compiled graph that lowered one matmul to bf16 would."""
    head = model.fine_acoustics.lm_heads[3]
    head.forward = lambda x: F.linear(x.to(torch.bfloat16), head.weight.to(torch.bfloat16)).to(x.dtype)


def ortint8_scale_off(model) -> None:
    """ONNX Runtime's int8 graph of the coarse model with one layer's block scales (its first MLP input projection)
    2 % off, as a wrong scale in an exported weight file would be."""
    import copy

    from onnx import numpy_helper

    from . import ort_int8

    sub = model.coarse_acoustics
    graph = copy.deepcopy(ort_int8.load_graph(sub.int8_graph_source))  # the variant's file is left as it is
    scales = next(t for t in graph.graph.initializer if t.name == "layers.0.mlp.in_proj.weight_t_scales")
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * 1.02, scales.name))
    ort_int8.install(sub, graph, torch.get_num_threads())


def static_kv_write_late(model) -> None:
    """The static-cache path writes each decode step's key and value one slot late (the prefill's as it should):
    the step's own token is missing where the mask lets the next steps read it."""
    def late(layer):
        def update(key_states, value_states, *args, **kwargs):
            if not layer.is_initialized:
                layer.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            slots = torch.arange(n, device=key_states.device) + layer.cumulative_length
            if n == 1:
                slots = (slots + 1).clamp_max(layer.keys.shape[2] - 1)
            layer.cumulative_length.add_(n)
            layer.keys.index_copy_(2, slots, key_states)
            layer.values.index_copy_(2, slots, value_states)
            return layer.keys, layer.values
        return update

    for sub in (model.semantic, model.coarse_acoustics):
        def prepare(*args, _prepare=sub._prepare_static_cache, **kwargs):
            cache = _prepare(*args, **kwargs)
            for layer in cache.layers:
                if "update" not in vars(layer):  # a cache kept across calls is wrapped once
                    layer.update = late(layer)
            return cache
        sub._prepare_static_cache = prepare


@dataclass(frozen=True)
class Case:
    name: str
    variant: str
    perturb: Callable | None = None  # None: the correct variant
    needs: str = ""  # the violation must name this (empty: any)

    @property
    def fault(self) -> bool:
        return self.perturb is not None


CASES = [
    Case("sdpa", "sdpa"),
    Case("bf16", "bf16"),
    Case("sdpa+bf16", "sdpa+bf16"),
    Case("int8", "int8"),
    Case("int8: one layer's scale 2 % off", "int8", int8_scale_off, "layer coarse_acoustics.layers.0.mlp.in_proj"),
    Case("int8: per-channel instead of per-tensor scales", "int8", int8_per_channel, "layer"),
    Case("int8: activation quantized twice", "int8", int8_activation_twice, "layer"),
    Case("bf16: softmax without fp32 accumulation", "bf16", bf16_softmax_accumulation),
    Case("sdpa: padded row's mask off by one", "sdpa", sdpa_mask_off_by_one, "padded batch"),
    Case("exact: one op (fine lm_heads[3], codebook 4) in bf16", "sdpa", fine_head_in_bf16, "fine[4]"),
    Case("ortint8", "ortint8"),
    Case("ortint8: one layer's block scales 2 % off", "ortint8", ortint8_scale_off,
         "layer coarse_acoustics.layers.0.mlp.in_proj"),
    Case("sdpa+static", "sdpa+static"),
    Case("static: a decode step's KV written one slot late", "sdpa+static", static_kv_write_late),
]


def _distance(limits, report) -> float:
    """The largest measure over its limit (1: at the limit), over the teacher-forced stages, the free-running paths
    and the chain's fine codes while their context is the baseline's, the layers and the padded batch; a decisive
    free-running divergence counts as infinitely far outside."""
    worst = 0.0
    for name, s in report["teacher_forced"].items():
        tol = fidelity.limit_for(limits, name)
        for measure, bound in (("kl_mean", tol.kl_mean), ("kl_p99", tol.kl_p99), ("max_dp_top", tol.max_dp_top),
                               ("max_rel", tol.logits_max_rel)):
            worst = max(worst, s[measure] / bound if bound else (math.inf if s[measure] else 0.0))
    padded = report.get("padded_batch")
    if padded:
        tol = fidelity.limit_for(limits, "semantic")
        worst = max(worst, padded["max_rel"] / tol.logits_max_rel, padded["kl_mean"] / tol.kl_mean)
    if report.get("layers"):
        worst = max(worst, report["layers"]["max_ratio"])
    for name, path in report["free_running"].items():  # same context: until the first divergence
        tol = fidelity.limit_for(limits, name)
        worst = max(worst, path["same_context_max_rel"] / tol.logits_max_rel)
    fd = report["chain"]["fine_decisions"]
    worst = max(worst, fd["same_context_max_rel"] / fidelity.limit_for(limits, "fine").logits_max_rel)
    paths = [*report["free_running"].values(), *report["batched"]["rows"]]
    if any(p["decisive_mismatches"] for p in paths) or report["chain"]["fine_decisions"]["decisive_mismatches"]:
        worst = math.inf
    return worst


def judge(source, case: Case, device: torch.device, tokens: int = 8, base=None, kept: dict | None = None) -> dict:
    """Load the case's variant as the check does, apply its fault, and judge it as `run_fidelity` does. `kept`: the
    reference simulation of each number format, its limits and its side of the measures, from earlier cases."""
    variant = variants.parse(case.variant)
    base = base or fidelity._load(source, variants.parse("eager"), device)
    _baseline_weights.clear()
    _baseline_weights.update({k: v.detach().clone() for k, v in base.model.state_dict().items()})
    candidate = fidelity._load(source, variant, device)
    if case.perturb:
        case.perturb(candidate.model)
    formats = tuple(variant.reference_formats)
    kept = {} if kept is None else kept
    if (formats, variant.limit) not in kept:  # the reference and its limits do not depend on the candidate
        reference = references.simulate(base.model, formats)
        limits, memo = variants.FLOAT_ROUNDING, {}
        if formats:
            base_tf, ref_tf = (fidelity.teacher_forced_logits(m, device) for m in (base.model, reference))
            cost = {k: fidelity.distribution_stats(base_tf[k], ref_tf[k]) for k in base_tf}
            limits = fidelity.stage_limits(variant.limit, cost, fidelity.codec_snr(base.model, reference))
            memo[("teacher_forced", 0)] = ref_tf
        kept[formats, variant.limit] = (reference, limits, memo)
    reference, limits, memo = kept[formats, variant.limit]
    cand_tf, layers = None, None
    if formats:  # one teacher-forced pass of the candidate for its stats and its layers
        cand_tf, layers = fidelity.teacher_forced_with_layers(base.model, reference, candidate.model, device,
                                                              variant.limit)
    report = fidelity.compare(reference, candidate.model, base.processor, device, tokens, limits=limits, memo=memo,
                              candidate_tf=cand_tf)
    report["layers"] = layers
    violations = fidelity.check(limits, report)
    recorded = ({k: fidelity._tolerance_dict(t) for k, t in limits.items()} if isinstance(limits, dict)
                else fidelity._tolerance_dict(limits))
    return {"case": case.name, "variant": case.variant, "fault": case.fault, "violations": violations,
            "limits": recorded,
            "distance": _distance(limits, report), "caught": bool(violations),
            "named": (not case.needs) or any(v.startswith(case.needs) for v in violations)}


def table(rows: list[dict]) -> str:
    lines = ["| case | variant | kind | largest measure / limit | verdict | first violation |", "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = ("caught" if r["caught"] else "**MISSED**") if r["fault"] else ("within" if not r["caught"]
                                                                                  else "**FAILS**")
        first = re.sub(r"\|", "/", r["violations"][0])[:90] if r["violations"] else ""
        lines.append(f"| {r['case']} | {r['variant']} | {'fault' if r['fault'] else 'correct'} | "
                     f"{r['distance']:.3g} | {verdict} | {first} |")
    return "\n".join(lines)


def record(model, device: torch.device, tokens: int, rows: list[dict], started_at: str) -> FaultSuite:
    """The suite's result as a record with its provenance; a decisive divergence (infinitely far outside) is
    written as distance null with `diverged` true."""
    from . import provenance

    source = model if isinstance(model, models.ModelSource) else models.resolve(model)
    return FaultSuite.from_dict({"schema_version": FAULTS_SCHEMA_VERSION, "kind": "fault-suite", "model": source.requested, "model_id": source.id, "weights": source.weights,
            "device": device.type, "tokens": tokens,
            "inputs": "the check's own prompts and inputs (seed 0); limits calibrated on seed 1",
            "hardware": provenance.hardware(device), "versions": provenance.versions(),
            "git_commit": provenance.git_commit(), "started_at": started_at, "finished_at": now(),
            "rows": [{"case": r["case"], "variant": r["variant"], "fault": r["fault"], "not_run": None,
                      "caught": r["caught"], "named": r["named"], "diverged": math.isinf(r["distance"]),
                      "distance": None if math.isinf(r["distance"]) else r["distance"],
                      "first_violation": r["violations"][0] if r["violations"] else None}
                     if "not_run" not in r else
                     {"case": r["case"], "variant": r["variant"], "fault": r["fault"], "not_run": r["not_run"],
                      "caught": None, "named": None, "diverged": False, "distance": None, "first_violation": None}
                     for r in rows]})


def set_aside_in_this_run(case: Case, device: torch.device, model: str) -> str | None:
    """Why a workflow run does not judge this case (None: it does): its variant cannot pay off on this CPU, as the
    fidelity check sets aside its check (bf16 without native bf16: several emulated calls per case, one case past a
    quarter of an hour on a 2-core AVX2 machine). The suite by hand judges every case."""
    why = cannot_pay_off_in_this_run(variants.parse(case.variant), device, model)
    return None if why is None else f"set aside in this run: {why}"


def cases_in_a_workflow_run(cpu_features) -> int:
    """How many cases a workflow run judges on a CPU with these features (`set_aside_in_this_run`): the run's
    estimate."""
    return sum(variants.parse(c.variant).pays_off_on(cpu_features) is None for c in CASES)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m barkbench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="synthetic:bark-small")
    parser.add_argument("--tokens", type=positive_int("tokens"), default=8)
    parser.add_argument("--out", help="write the suite's record (JSON) here, atomically")
    parser.add_argument("--offline-fallback", choices=["synthetic"], default=None,
                        help="a hub model that cannot be reached runs as its synthetic twin")
    parser.add_argument("--threads", type=positive_int("threads"), default=None,
                        help="torch intra-op threads (default: all physical cores, whatever OMP_NUM_THREADS says)")
    args = parser.parse_args(argv)
    use_threads(args.threads)
    started = now()
    job = job_time_limit(math.inf, time.time())  # the run's deadline, when the workflow set one
    source, device = models.resolve(args.model, args.offline_fallback), torch.device("cpu")
    base = fidelity._load(source, variants.parse("eager"), device)
    rows, longest, kept = [], 0.0, {}
    for case in tqdm(CASES, desc="cases"):
        aside = set_aside_in_this_run(case, device, args.model)
        if aside is None and job.limit_s - job.elapsed() < longest:
            aside = FAULT_BUDGET_SPENT  # the next case would not end before the run's deadline: the rest are said, not run
        if aside:
            rows.append({"case": case.name, "variant": case.variant, "fault": case.fault, "not_run": aside})
            continue
        torch._dynamo.reset()
        t0 = time.perf_counter()
        rows.append(judge(source, case, device, args.tokens, base, kept))
        longest = max(longest, time.perf_counter() - t0)
    print(f"Fault suite on {args.model} (cpu, check inputs seed 0; limits calibrated on seed 1):\n")
    print(table([r for r in rows if "not_run" not in r]))
    if args.out:
        record(source, device, args.tokens, rows, started).save_json(args.out)  # validated, written atomically


if __name__ == "__main__":
    main()
