"""An instruction-set ceiling (barkbench.isa): this CPU run as an older one, in its own hardware folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from barkbench import isa, plan, provenance, variants
from conftest import TINY, TORCH_THREADS

NATIVE = provenance.native_cpu_features()
BEYOND_AVX2 = [f for f in NATIVE if f != "avx2"]


def _python(code: str, ceiling: str, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, isa.ENV: ceiling, **env}
    for name in {n for c in isa.CEILINGS.values() for n in c["env"]}:  # only the ceiling may set them
        environ.pop(name, None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)


ONEDNN_AND_ATEN = """
import barkbench, torch
x = torch.randn(1, 64, 64, 64)
torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3))  # a oneDNN primitive: its verbose line names its ISA
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.skipif("avx2" not in NATIVE, reason="the avx2 ceiling caps a CPU that has AVX2 at least")
def test_the_avx2_ceiling_reaches_the_kernels_of_aten_and_onednn():
    capped = _python(ONEDNN_AND_ATEN, "avx2", ONEDNN_VERBOSE="1")
    assert capped.returncode == 0, capped.stderr[-2000:]
    assert capped.stdout.strip().splitlines()[-1] == "AVX2"
    assert "cpu,isa:Intel AVX2\n" in capped.stdout + capped.stderr
    if BEYOND_AVX2:  # on a CPU beyond AVX2 the native run picks other kernels: the ceiling is what changed them
        native = _python(ONEDNN_AND_ATEN, "native", ONEDNN_VERBOSE="1")
        assert native.stdout.strip().splitlines()[-1] != "AVX2"
        assert "cpu,isa:Intel AVX2\n" not in native.stdout + native.stderr


def test_a_ceiling_that_does_not_exist_is_refused_at_import():
    out = _python("import barkbench", "avx3")
    assert out.returncode != 0 and "BARKBENCH_CPU_ISA='avx3': use native or one of avx2, avx512" in out.stderr


def test_a_ceiling_set_too_late_is_an_error_not_a_label(monkeypatch):
    """This process chose its kernels long ago: recording its hardware under a ceiling now must refuse."""
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        pytest.skip("ATen already runs AVX2 kernels here")
    monkeypatch.setenv(isa.ENV, "avx2")
    with pytest.raises(isa.CeilingError, match="ATen runs .* kernels, not AVX2"):
        provenance.hardware(torch.device("cpu"))


def test_the_runtimes_that_pick_their_own_kernels_are_not_applicable_under_a_ceiling(monkeypatch):
    for variant in ("finewin+ort", "ov"):  # asked first without a ceiling, as an earlier test in this worker may have
        variants.parse(variant).not_applicable_reason(torch.device("cpu"))
    monkeypatch.setenv(isa.ENV, "avx2")
    for variant, runtime in (("finewin+ort", "ONNX Runtime"), ("ov", "OpenVINO")):
        reason = variants.parse(variant).not_applicable_reason(torch.device("cpu"))
        assert reason.startswith("not applicable under the avx2 ceiling: ") and runtime in reason


@pytest.mark.skipif(not BEYOND_AVX2, reason="needs a CPU beyond AVX2 to cap")
def test_a_capped_run_records_the_capped_cpu_in_its_own_folder_and_bf16_gets_its_early_verdict(tiny_checkpoint,
                                                                                                  tmp_path):
    """Under the avx2 ceiling the record names the capped features (bf16 then cannot pay off: one call, not timed
    further, when slower than the run's probe of the baseline) and the CPU's own; ATen ran AVX2 kernels."""
    out = tmp_path / "rep1.json"
    code = ("import sys; from barkbench.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = ["run", "--model", TINY, "--variant", "sdpa+bf16", "--device", "cpu", "--threads", str(TORCH_THREADS),
            "--warmup", "1", "--min-iterations", "2", "--max-iterations", "2", "--max-new-tokens", "8",
            "--out", str(out)]
    environ = {**os.environ, isa.ENV: "avx2", "BARKBENCH_BASELINE_CALL_S": json.dumps({TINY: [1e-6, 1]})}
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=environ,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    hw = record["hardware"]
    assert hw["id"].endswith("-avx2") and hw["cpu_isa_ceiling"] == "avx2"
    assert hw["cpu_features"] == ["avx2"] and hw["cpu_features_native"] == NATIVE
    assert hw["calibration"]["cpu_capability"] == "AVX2"
    assert record["status"] == "too_slow" and "bf16 needs avx512_bf16 or amx_bf16" in record["reason"]


def test_a_capped_machine_is_its_own_folder_and_a_gpu_cannot_be_capped(tmp_path):
    environ = dict(os.environ)
    found = plan.machine({"device": "cpu", "cpu_isa": "avx2"}, python=sys.executable, environ=environ)
    native = plan.machine({"device": "cpu", "cpu_isa": "native"}, python=sys.executable, environ=dict(os.environ))
    assert found == {"id": native["id"] + "-avx2", "device": "cpu"}
    assert environ[isa.ENV] == "avx2" and environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"  # what every job inherits
    target = plan.machine({"hardware": "cpu-partition", "device": "cpu", "cpu_isa": "avx512"}, environ={})
    assert target == {"id": "cpu-partition-avx512", "device": "cpu"}
    with pytest.raises(plan.PlanError, match="config: cpu_isa avx2 caps a CPU's kernels; the jobs run on cuda"):
        plan.machine({"hardware": "gpu-partition", "device": "cuda", "cpu_isa": "avx2"}, environ={})
