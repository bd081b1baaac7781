"""int8 under torch.compile (`barkbench.int8_compile`): torch.ao's dynamic int8 Linear as one opaque operator, so
the decode step compiles around the same kernel. On synthetic:tiny: the tokens of the uncompiled int8 variant, the
stage work of the model unchanged, the fidelity check's per-layer hooks still see every layer, and a dropped model
leaves nothing behind."""
from __future__ import annotations

import gc

import pytest
import torch

from barkbench import calibration, fidelity, int8_compile
from conftest import assert_compiled_check_passes, PROMPTS, load_short_window, stage_tokens

PAIR = ("sdpa+int8+static", "sdpa+int8+static+compile")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    torch._dynamo.reset()
    return {name: load_short_window(name) for name in PAIR}


def test_every_dynamic_int8_linear_is_wrapped_and_the_decode_step_compiles(loaded):
    model = loaded["sdpa+int8+static+compile"].model
    wrapped = [m for m in model.modules() if isinstance(m, int8_compile.CompilableDynamicLinear)]
    plain = [m for m in loaded["sdpa+int8+static"].model.modules() if int8_compile.is_dynamic_int8(m)]
    assert wrapped and len(wrapped) == len(plain)
    assert all(int8_compile.is_dynamic_int8(m.linear) for m in wrapped)
    for sub in (model.semantic, model.coarse_acoustics):
        assert sub.decode_compile is not None and sub.decode_compile.fullgraph


@pytest.mark.parametrize("prompts, do_sample", [pytest.param([PROMPTS[0]], False, id="greedy-bs1"),
                                                pytest.param(PROMPTS + ["Hi"], True, id="sampled-padded-bs3")])
def test_compiled_int8_gives_the_tokens_of_uncompiled_int8(loaded, prompts, do_sample):
    plain = stage_tokens(loaded["sdpa+int8+static"], prompts, do_sample)
    compiled = stage_tokens(loaded["sdpa+int8+static+compile"], prompts, do_sample)
    for stage in ("semantic", "coarse", "fine"):
        assert torch.equal(compiled[stage], plain[stage]), stage
    # the compiled decode step ran (fullgraph: a graph break would have raised)
    assert hasattr(loaded["sdpa+int8+static+compile"].model.semantic, "_compiled_call")


def test_the_stage_work_is_the_models_wrapped_or_not(loaded):
    plain, compiled = (calibration.stage_work(loaded[name].model) for name in PAIR)
    assert compiled == plain and compiled["fine"]["gemm_dtype"] == "int8"


def test_the_per_layer_check_sees_the_layers_of_uncompiled_int8(loaded):
    """The hooks sit on the layer the operator calls: the same layers as without compile."""
    from barkbench import references, variants

    baseline = load_short_window("eager").model
    reference = references.simulate(baseline, ["int8-dynamic"])
    limit = variants.parse("int8").limit
    plain, compiled = (fidelity.layer_check(baseline, reference, loaded[name].model, torch.device("cpu"), limit)
                       for name in PAIR)
    assert compiled["layers"] == plain["layers"] > 0
    # compiled norms round differently, so a layer's input may differ in the last bits: errors alike, not equal
    assert compiled["max_ratio"] == pytest.approx(plain["max_ratio"], rel=0.1) and compiled["outside"] == []


def test_the_whole_fidelity_check_passes(tiny_checkpoint, tmp_path):
    assert_compiled_check_passes("sdpa+int8+static+compile", tmp_path)


def test_a_dropped_model_leaves_no_layer_behind(tiny_checkpoint):
    before = set(int8_compile._MODULES)

    def wrap_one() -> set:
        model = load_short_window("sdpa+int8").model
        assert int8_compile.make_compilable(model) > 0
        return set(int8_compile._MODULES) - before

    handles = wrap_one()
    gc.collect()
    assert handles and not handles & set(int8_compile._MODULES)
