"""On a CUDA device: every optimization of the registry, and every variant of the default config, runs (or says
which package it misses), measures CUDA memory and passes its fidelity check. Skipped without CUDA:
`pytest -m cuda` on a GPU machine."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from barkbench import fidelity, runner, variants
from barkbench.protocol import Protocol
from conftest import TINY

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
DEFAULT_VARIANTS = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())["variants"]
EVERY_OPTIMIZATION = [variants.canonical("+".join([n, *o.requires])) for n, o in variants.REGISTRY.items()]
VARIANTS = list(dict.fromkeys(EVERY_OPTIMIZATION + DEFAULT_VARIANTS))


def _missing_package(variant):
    reason = variants.parse(variant).not_applicable_reason(CUDA)
    return reason if reason and "needs the package" in reason else None


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_on_cuda(variant, tmp_path):
    protocol = Protocol(warmup=1, min_iterations=2, max_iterations=2, batch_size=2, max_new_tokens=8)
    result = runner.run(runner.RunRequest(TINY, variant, protocol, device="cuda"), tmp_path / "bs2.json")
    if _missing_package(variant):
        assert result["status"] == "not_applicable" and result["reason"] == _missing_package(variant)
        return
    reason = variants.parse(variant).not_applicable_reason(CUDA)
    if reason:  # CPU-only (int8)
        assert result["status"] == "not_applicable" and result["reason"] == reason
        return
    assert result["status"] == "ok", result["reason"]
    assert result["device"]["type"] == "cuda" and len(result["iterations"]["latency_s"]) == 2
    assert min(result["iterations"]["latency_s"]) > 0
    memory = result["memory"]
    assert memory["cuda_peak_allocated_bytes"] > 0
    assert memory["cuda_peak_reserved_bytes"] >= memory["cuda_peak_allocated_bytes"]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "eager"])
def test_fidelity_on_cuda(variant, tmp_path):
    report = fidelity.run_fidelity(TINY, variant, str(tmp_path / "fid.json"), device_name="cuda", tokens=8)
    if variants.parse(variant).not_applicable_reason(CUDA):
        assert report["status"] == "not_applicable"
        return
    assert report["status"] == "ok", report["reason"]
    assert report["within_tolerance"], report["violations"]
