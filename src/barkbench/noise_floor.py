"""Calibration of the fidelity limits (`python -m barkbench.noise_floor MODEL VARIANT...`), on teacher-forced inputs
of seed 1, disjoint from the check's (seed 0):

- `fp32`: fp32's own rounding, the floor of every limit: the eager model in float32 against itself in float64;
- each variant: its reference simulation's distance to the baseline (what the format costs) and the correct
  implementation's distance to that reference, as a share of the cost (logit error, |Δp|, the square root of KL:
  the same scale as `ImplementationLimit.model_share`), and per simulated layer (`layer_share`).

The registry's limits (`barkbench.variants`) are set from these numbers, never from the variant a check judges;
the fault suite (`python -m barkbench.faults`) shows that faults near the limits fall outside.
"""
from __future__ import annotations

import argparse
import copy
import json
import math

import torch

from . import fidelity, models, references, variants

CALIBRATION_SEED = 1  # the check uses seed 0
MEASURES = ("kl_mean", "kl_p99", "max_dp_top", "max_rel")


def _worst(stats: dict) -> dict:
    return {**{k: max(s[k] for s in stats.values()) for k in MEASURES},
            "min_same_top1": min(s["same_top1"] for s in stats.values())}


def _shares(impl: dict, cost: dict) -> dict:
    """The implementation's distance over the format's, per stage, worst over stages (KL: square root)."""
    out = {}
    for k in MEASURES:
        ratios = [(impl[s][k] / cost[s][k]) if cost[s][k] else (0.0 if not impl[s][k] else math.inf) for s in cost]
        out[k] = max(math.sqrt(r) if k.startswith("kl") else r for r in ratios)
    return out


def measure(model_id: str, names: list[str], seed: int = CALIBRATION_SEED,
            device: torch.device = torch.device("cpu")) -> list[dict]:
    source = models.resolve(model_id)
    base = fidelity._load(source, variants.parse("eager"), device).model
    rows = []
    for name in names:
        if name == "fp32":
            exact = copy.deepcopy(base).double()
            rows.append({"model": model_id, "device": device.type, "seed": seed, "variant": "fp32",
                         "float64_vs_float32": _worst(fidelity.teacher_forced(exact, base, device, seed))})
            continue
        variant = variants.parse(name)
        cand = fidelity._load(source, variant, device).model
        reference = references.simulate(base, variant.reference_formats)
        cost = fidelity.teacher_forced(base, reference, device, seed)
        impl = fidelity.teacher_forced(reference, cand, device, seed)
        layers = fidelity.layer_check(base, reference, cand, device, variant.limit, seed)
        rows.append({"model": model_id, "device": device.type, "seed": seed, "variant": name,
                     "formats": variant.reference_formats,
                     "format_cost": _worst(cost), "implementation_vs_reference": _worst(impl),
                     "implementation_share_of_cost": _shares(impl, cost) if variant.reference_formats else None,
                     "layer_share_max": (layers["max_ratio"] * variant.limit.layer_share) if layers else None})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m barkbench.noise_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("variants", nargs="+", help="registry variants, or fp32 for the rounding floor")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: the floors of that device's kernels")
    args = parser.parse_args(argv)
    for name in args.variants:
        if name != "fp32":
            variants.parse(name)  # refuse unknown names before any model is loaded
    from .provenance import resolve_device

    for row in measure(args.model, args.variants, device=resolve_device(args.device)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
