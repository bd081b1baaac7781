"""int8 weight-only on a CPU (`barkbench.int8_gemv`, the `int8wo` optimization there): the format's numbers on both
paths, a GEMV that computes its input once when compiled, the bytes a decode step reads, and the whole fidelity check
of the variant on synthetic:tiny."""
from __future__ import annotations


import pytest
import torch

from barkbench import calibration, int8_gemv, references, variants
from conftest import assert_compiled_check_passes, load_short_window

CPU = torch.device("cpu")


def _linear(k=96, n=40, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    linear.weight.data[3] *= 40  # one row with a far larger range: the scale is per output channel
    return linear


@pytest.mark.parametrize("rows", [1, 5], ids=["decode-step", "prefill"])
def test_both_paths_compute_the_reference_format(rows):
    linear = _linear()
    reference = references.FakeQuantLinear(
        linear, references.fake_quant_symmetric(linear.weight, references.per_channel_scale(linear.weight)), None)
    quantized = int8_gemv.Int8WeightOnlyLinear(linear)
    x = torch.randn(2, rows, 96)[:1]
    with torch.inference_mode():
        expected = reference(x)
        got = torch.compile(quantized, fullgraph=True, dynamic=False)(x)
    assert got.shape == expected.shape == (1, rows, 40)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the weights really are int8, and the per-channel scale spans the enlarged row
    assert quantized.weight_int8.dtype == torch.int8 and quantized.scale[3] > 10 * quantized.scale[2]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_compiled_gemv_computes_its_input_once(threads):
    """Inlined into the reduction, a GELU before the GEMV would be recomputed for every output row: the loop nest
    that reads the int8 weights must not contain it (one thread or several: with one, inductor writes no OpenMP)."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    quantized = int8_gemv.Int8WeightOnlyLinear(_linear(n=64))
    step = torch.compile(lambda x: quantized(torch.nn.functional.gelu(x)), fullgraph=True, dynamic=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), fresh_cache():  # compiled here, not read back from another test's cache
            _, codes = run_and_get_code(step, torch.randn(1, 1, 96))
    finally:
        torch.set_num_threads(before)
    nests = [nest for code in codes for nest in code.split("for(int64_t x0=")[1:]]  # each outermost loop nest
    reads_int8 = [nest for nest in nests if "Vectorized<int8_t>::loadu" in nest]
    assert reads_int8 and any("erf" in nest for nest in nests)
    assert not any("erf" in nest for nest in reads_int8)


def test_int8wo_runs_on_a_cpu_without_torchao_but_not_with_half_activations():
    assert variants.parse("sdpa+int8wo+static+compile").not_applicable_reason(CPU) is None
    reason = variants.parse("sdpa+int8wo+bf16+compile").not_applicable_reason(CPU)
    assert reason.startswith("not applicable on cpu: int8wo with bf16") and "fp32 activations" in reason


def test_a_decode_step_reads_the_int8_weights(tiny_checkpoint):
    eager = calibration.stage_work(load_short_window("sdpa").model)
    model = load_short_window("sdpa").model
    assert int8_gemv.quantize_linears(model.semantic) > 0
    work = calibration.stage_work(model)
    linears = [m for m in model.semantic.modules() if isinstance(m, int8_gemv.Int8WeightOnlyLinear)]
    saved = sum(3 * m.weight_int8.numel() - 4 * m.scale.numel() for m in linears)  # fp32 -> int8 + a scale per row
    assert work["semantic"]["bytes_per_step"] == eager["semantic"]["bytes_per_step"] - saved
    assert work["coarse"] == eager["coarse"]
    # its GEMMs (prefill, fine frames) read the dequantized fp32 copy
    assert calibration.gemm_dtype(model.semantic) == "fp32"


def test_the_whole_fidelity_check_passes(tiny_checkpoint, tmp_path):
    assert_compiled_check_passes("sdpa+int8wo+static+compile", tmp_path)
