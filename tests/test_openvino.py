"""OpenVINO as a variant (`ov`): it runs through the benchmark on the tiny model where OpenVINO works, and is
recorded as not applicable where it does not (the default install has no OpenVINO)."""
from __future__ import annotations

import sys

import pytest
import torch

from barkbench import openvino_runtime, runner, variants
from barkbench.records import RunResult
from barkbench.protocol import Protocol
from conftest import TINY, TORCH_THREADS

CPU = torch.device("cpu")


def _protocol() -> Protocol:
    """Built when a test runs, not at collection: Protocol validates with jsonschema, which a bare GPU node's
    `pytest -m cuda` collects without (tests/test_gpu_node.py)."""
    return Protocol(warmup=1, min_iterations=1, max_iterations=1, batch_size=1, max_new_tokens=8, do_sample=False)


@pytest.fixture
def fresh_check():
    openvino_runtime._runtime_problem.cache_clear()
    yield
    openvino_runtime._runtime_problem.cache_clear()


def test_ov_is_not_applicable_when_openvino_cannot_import(fresh_check, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    reason = variants.parse("ov").not_applicable_reason(CPU)
    assert reason.startswith("not applicable here: OpenVINO is not usable (") and "openvino" in reason
    result = runner.run(runner.RunRequest(TINY, "ov", _protocol(), device="cpu", threads=TORCH_THREADS),
                        tmp_path / "ov" / "bs1.json")
    RunResult.from_dict(result.to_dict())
    assert result.status == "not_applicable" and result.reason == reason
    assert result.timing is None


def test_ov_is_not_for_cuda():
    reason = variants.REGISTRY["ov"].cuda_reason
    assert reason and "CPU plugin" in reason
    assert variants.canonical("ov+sdpa+static") == "sdpa+static+ov"
    with pytest.raises(variants.VariantError, match="both set the compile"):
        variants.parse("sdpa+compile+ov")


@pytest.mark.parametrize("variant", ["ov", "sdpa+static+ov"])
def test_ov_runs_on_openvino(variant, fresh_check, tiny_checkpoint, tmp_path):
    if reason := openvino_runtime.unavailable_reason():
        pytest.skip(reason)
    from openvino.frontend.pytorch.torchdynamo import execute

    execute.compiled_cache.clear()
    result = runner.run(runner.RunRequest(TINY, variant, _protocol(), device="cpu", threads=TORCH_THREADS),
                        tmp_path / variant / "bs1.json")
    RunResult.from_dict(result.to_dict())
    assert result.status == "ok", result.reason
    assert any("OpenVINO" in note for note in result.variant["notes"])
    assert result.timing.compile_s is not None
    # The backend falls back to inductor without a word when it cannot convert a graph: the OpenVINO models it
    # compiled for this run are the evidence that OpenVINO ran.
    assert execute.compiled_cache, "no graph was compiled by OpenVINO"
