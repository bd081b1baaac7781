"""On a CUDA device: every optimization of the registry, and every variant of the default config, runs,
measures CUDA memory and passes its fidelity check; a compiled static-cache variant shows its CUDA graphs
replaying. A variant this node cannot run is a skip with its reason, never a pass; `BARKBENCH_EXPECT=fa2,nf4`
makes the skip of the optimizations it names a failure. Skipped without CUDA: `pytest -m cuda` on a GPU machine."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from barkbench import fidelity, runner, variants
from barkbench.protocol import Protocol
from conftest import TINY, skip_not_applicable

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
DEFAULT_VARIANTS = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())["variants"]
EVERY_OPTIMIZATION = [variants.canonical("+".join([n, *o.requires])) for n, o in variants.REGISTRY.items()]
VARIANTS = list(dict.fromkeys(EVERY_OPTIMIZATION + DEFAULT_VARIANTS))


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_on_cuda(variant, tmp_path):
    protocol = Protocol(warmup=1, min_iterations=2, max_iterations=2, batch_size=2, max_new_tokens=8)
    result = runner.run(runner.RunRequest(TINY, variant, protocol, device="cuda"), tmp_path / "bs2.json")
    reason = variants.parse(variant).not_applicable_reason(CUDA)
    if reason:
        assert result.status == "not_applicable" and result.reason == reason
        skip_not_applicable(variant, reason)
    assert result.status == "ok", result.reason
    assert result.device["type"] == "cuda" and len(result.iterations.latency_s) == 2
    assert min(result.iterations.latency_s) > 0
    memory = result.memory
    assert memory.cuda_peak_allocated_bytes > 0
    assert memory.cuda_peak_reserved_bytes >= memory.cuda_peak_allocated_bytes
    names = variants.parse(variant).names
    if variants.parse(variant).compiles:
        compiled = result.extra["compiled"]
        if "static" in names:  # the decode step, captured once, replays every step of every timed call
            assert compiled["cuda_graph_replays_timed"] > 0, compiled
            assert compiled["cuda_graph_skips"] == 0, compiled["cuda_graph_skip_reasons"]
            assert compiled["recompiles_timed"] == 0, compiled
    else:
        assert "compiled" not in result.extra


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "eager"])
def test_fidelity_on_cuda(variant, tmp_path):
    report = fidelity.run_fidelity(TINY, variant, str(tmp_path / "fid.json"), device_name="cuda", tokens=8)
    reason = variants.parse(variant).not_applicable_reason(CUDA)
    if reason:
        assert report["status"] == "not_applicable"
        skip_not_applicable(variant, reason)
    assert report["status"] == "ok", report["reason"]
    assert report["within_tolerance"], report["violations"]
