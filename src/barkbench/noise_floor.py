"""Noise floors of the fidelity measures: how far legitimate numeric changes move the teacher-forced
distributions of every sub-model against eager fp32 (`python -m barkbench.noise_floor MODEL VARIANT...`).

The tolerances in `barkbench.variants` are set from these numbers. Besides registry variants it measures
`nf4-weights`: NF4 rounding of the transformers' Linear weights (blocks of 64, absmax scale, the
bitsandbytes code book) computed in fp32, i.e. the 4-bit weight error alone where bitsandbytes cannot run.
"""
from __future__ import annotations

import argparse
import json

import torch

from . import fidelity, models, variants

# bitsandbytes' NF4 code book (quantiles of a unit normal, scaled to [-1, 1])
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def nf4_round(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """`weight` rounded to NF4 in blocks of `block` values with an absmax scale each."""
    flat = weight.detach().float().reshape(-1, block)
    scale = flat.abs().amax(1, keepdim=True).clamp_min(1e-12)
    codes = (flat / scale).unsqueeze(-1).sub(NF4).abs().argmin(-1)
    return (NF4[codes] * scale).reshape(weight.shape).to(weight.dtype)


def _nf4_weights(model) -> None:
    for sub in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
        for module in sub.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.numel() % 64 == 0:
                with torch.no_grad():
                    module.weight.copy_(nf4_round(module.weight))


def measure(model_id: str, names: list[str], seed: int = 0, device: torch.device = torch.device("cpu")) -> list[dict]:
    source = models.resolve(model_id)
    base = fidelity._load(source, variants.parse("eager"), device)
    rows = []
    for name in names:
        if name == "nf4-weights":
            cand = fidelity._load(source, variants.parse("eager"), device)
            _nf4_weights(cand.model)
        else:
            cand = fidelity._load(source, variants.parse(name), device)
        stats = fidelity.teacher_forced(base.model, cand.model, device, seed)
        codes = torch.randint(0, base.model.generation_config.codebook_size, (1, 8, 150),
                              generator=torch.Generator().manual_seed(seed)).to(device)  # 2 s of random codes
        with torch.inference_mode():
            codec_snr = None if fidelity.codec_untouched(base.model, cand.model) else fidelity.snr_db(
                base.model.codec_decode(codes)[0].float().cpu().numpy(),
                cand.model.codec_decode(codes)[0].float().cpu().numpy())
        worst = {k: max(s[k] for s in stats.values()) for k in ("kl_mean", "kl_p99", "max_dp_top", "max_abs", "max_rel")}
        rows.append({"model": model_id, "variant": name, "device": device.type, "worst_over_sub_models": worst, "codec_snr_db": codec_snr,
                     "min_same_top1": min(s["same_top1"] for s in stats.values()),
                     "baseline_margin_median": {k: s["margin"]["median"] for k, s in stats.items()}})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m barkbench.noise_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: the floors of that device's kernels")
    args = parser.parse_args(argv)
    for name in args.variants:
        if name != "nf4-weights":
            variants.parse(name)  # refuse unknown names before any model is loaded
    from .provenance import resolve_device

    for row in measure(args.model, args.variants, device=resolve_device(args.device)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
