"""ONNX Runtime's int8 decode (`ortint8`): the reference simulation of its number format is the kernel's arithmetic
layer by layer, its graph with in-place key/value buffers steps generate's sequences as one full forward computes
them, the variant is within its fidelity limits, and the floor counts the int8 weights it reads."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from barkbench import calibration, fidelity, models, ort_int8, ort_runtime, references, variants
from barkbench.protocol import DEFAULT_PROMPTS
from conftest import SHORT_WINDOW, TINY, TORCH_THREADS, load_short_window, load_variant, stage_tokens

CPU = torch.device("cpu")
pytestmark = [pytest.mark.skipif(ort_runtime.unavailable_reason() is not None,
                                 reason=ort_runtime.unavailable_reason() or "")]


def _kernel(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear` as ONNX Runtime runs it in the variant: MatMulNBits from its quantizer, accuracy level 4."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n = linear.in_features, linear.out_features
    body = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                             [helper.make_tensor_value_info("x", T.FLOAT, ["rows", k])],
                             [helper.make_tensor_value_info("y", T.FLOAT, ["rows", n])],
                             [numpy_helper.from_array(linear.weight.detach().t().contiguous().numpy(), "w")])
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(helper.make_model(body, opset_imports=[helper.make_opsetid("", 18)]), bits=8,
                                     block_size=ort_int8.BLOCK, is_symmetric=True,
                                     accuracy_level=ort_int8.ACCURACY_LEVEL)
    quantizer.process()
    session = ort.InferenceSession(quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("k, n", [(768, 2304), (3072, 768), (32, 64)], ids=["blocks", "long", "one-short-block"])
def test_reference_is_the_kernel(k, n):
    """The `int8-block` simulation (weights, their rounding ties included, and per-block activations) gives the
    kernel's output to float rounding, where the nearest other int8 scheme (per output channel, fp32 activations)
    is off by a share of the format's own error; a layer norm's output (a few large channels) as input."""
    torch.manual_seed(k + n)
    linear = torch.nn.Linear(k, n, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.02)
    x = torch.nn.functional.layer_norm(torch.randn(17, k) * (1 + 4 * torch.rand(k)), (k,)) * (1 + torch.rand(k))
    with torch.no_grad():
        got = _kernel(linear, x)
        sim = references.FakeQuantLinear(linear, references.int8_block_weight(linear.weight),
                                          references.int8_block_activation)(x)
        other = references.FakeQuantLinear(linear, references.fake_quant_symmetric(
            linear.weight, references.per_channel_scale(linear.weight)), None)(x)
        scale, format_error = linear(x).abs().max().item(), (sim - linear(x)).abs().max().item()
    assert (got - sim).abs().max().item() <= 1e-5 * scale
    assert (got - other).abs().max().item() > 0.1 * format_error


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    return load_short_window("finewin")


def _fp32_graphs(loaded):
    """`loaded` with its semantic and coarse forward on the variant's graphs and buffers, MatMuls left in fp32: the
    graph and the buffer handling alone, exact against PyTorch."""
    for sub in (loaded.model.semantic, loaded.model.coarse_acoustics):
        sub.forward = ort_int8.causal_forward(sub, ort_int8.Decoder(sub, ort_int8.graph(sub), TORCH_THREADS))
    return loaded


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_buffers_step_generate_as_pytorch_does(eager, do_sample):
    """generate over the graphs' in-place buffers (prefill, decode steps, a new sequence per coarse window, a
    left-padded batch of 2) gives PyTorch's tokens at every stage."""
    on_graphs = _fp32_graphs(load_short_window("finewin"))
    ref = stage_tokens(eager, DEFAULT_PROMPTS[:2], do_sample=do_sample)
    got = stage_tokens(on_graphs, DEFAULT_PROMPTS[:2], do_sample=do_sample)
    assert got["coarse"].shape[-1] > SHORT_WINDOW  # more than one coarse window
    for stage in ("semantic", "coarse", "fine"):
        assert torch.equal(got[stage], ref[stage]), stage


def test_decode_steps_equal_one_forward(eager):
    """A prefill then single-token steps give the logits of one forward over the whole sequence, and a past from
    another cache is refused (its keys and values are not in the buffers)."""
    from transformers import DynamicCache

    sub = _fp32_graphs(load_variant("finewin")).model.semantic
    ids = torch.randint(0, 10_000, (1, 12))
    with torch.no_grad():
        full = eager.model.semantic(input_ids=ids).logits
        cache = DynamicCache(config=sub.config)
        steps = [sub(input_ids=ids[:, :8], cache=cache, use_cache=True).logits]
        steps += [sub(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(8, 12)]
        assert cache.get_seq_length() == 12
        err = (torch.cat(steps, dim=1) - full).abs().max().item()
        assert err <= variants.FLOAT_ROUNDING.logits_max_rel * full.abs().max().item()
        other = DynamicCache(config=sub.config)
        sub(input_ids=ids[:, :3], cache=other, use_cache=True)
        with pytest.raises(RuntimeError, match="a past from another cache"):
            sub(input_ids=ids[:, 8:9], cache=cache, use_cache=True)


def test_within_its_fidelity_limits(tiny_checkpoint, tmp_path):
    """The variant against the `int8-block` simulation of the baseline: within the int8 limits (teacher-forced,
    free-running, the padded batch), and the format's cost recorded."""
    out = tmp_path / "check.json"
    report = fidelity.run_fidelity(TINY, "finewin+ortint8", str(out), device_name="cpu", tokens=8,
                                   threads=TORCH_THREADS)
    assert json.loads(out.read_text())["status"] == "ok", report["reason"]
    assert report["reference"]["formats"] == ["int8-block", "fine-window"]
    assert report["within_tolerance"] is True, report["violations"]
    assert report["format_cost"]["reference"]["semantic"]["kl_mean"] > 0  # the simulation is lossy


def test_floor_counts_the_int8_weights(tiny_checkpoint):
    """A decode step of the variant reads what its session holds: per Linear layer one byte per weight of its input
    padded to whole blocks and one fp32 scale per block, the layer norms in fp32; not the fp32 weights PyTorch keeps."""
    sub = load_variant("finewin+ortint8").model.semantic
    expected = 0
    for module in sub.modules():
        if isinstance(module, torch.nn.Linear):
            blocks = -(-module.in_features // ort_int8.BLOCK)
            expected += module.out_features * blocks * (ort_int8.BLOCK + 4) + (
                4 * module.bias.numel() if module.bias is not None else 0)
        elif isinstance(module, torch.nn.LayerNorm):
            expected += 4 * sum(p.numel() for p in module.parameters())
    expected += 8 * 3 * len(sub.layers)  # each layer's split sizes (int64)
    assert calibration.bytes_read_per_step(sub) == expected
    assert calibration.bytes_read_per_step(load_variant("finewin").model.semantic) != expected


def test_spelling_and_conflicts():
    for other in ("int8wo", "ort", "static", "bf16"):
        with pytest.raises(variants.VariantError):
            variants.parse(f"{other}+ortint8")
    assert variants.parse("ortint8").limit == variants.INT8_BLOCKS
    assert variants.parse("ortint8").reference_formats == ["int8-block"]
    assert "CPU execution provider" in variants.REGISTRY["ortint8"].cuda_reason


def test_int8_takes_the_fine_model_and_the_reference_follows(tiny_checkpoint):
    """With int8, ONNX Runtime still runs the semantic and coarse models on graphs built from the fp32 weights, and
    torch.ao quantizes the fine model only; the reference simulates exactly that: int8 blocks for the semantic and
    coarse layers, torch.ao's format for the fine model's."""
    variant = variants.parse("int8+ortint8")
    assert variant.name == "int8+ortint8"
    assert variant.reference_formats == ["int8-block", "int8-dynamic"]
    model = load_variant("int8+ortint8").model
    for sub in (model.semantic, model.coarse_acoustics):
        assert ort_int8.runs(sub)
        assert all(type(m) is torch.nn.Linear for n, m in sub.named_modules() if n.endswith(("proj", "lm_head")))
    fine_linears = [m for n, m in model.fine_acoustics.named_modules() if n.endswith(("proj", "lm_heads.0"))]
    assert fine_linears and all(type(m).__module__.startswith("torch.ao") for m in fine_linears)
    reference = references.simulate(load_variant("eager").model, variant.reference_formats)
    semantic_layer = reference.semantic.layers[0].mlp.in_proj
    fine_layer = reference.fine_acoustics.layers[0].mlp.in_proj
    assert semantic_layer.activation is references.int8_block_activation
    assert fine_layer.activation is references.fake_quant_activation


def test_int8_and_ortint8_within_fidelity_limits(tiny_checkpoint, tmp_path):
    """The default config's ortint8 variant: int8 on the fine model, each layer against its own format's simulation,
    and the device-side loop stepping the graphs, whose every step the check's recorder sees (through the forward):
    within the limits."""
    out = tmp_path / "check.json"
    report = fidelity.run_fidelity(TINY, "sdpa+int8+devloop+finewin+ortint8", str(out), device_name="cpu", tokens=8,
                                   threads=TORCH_THREADS)
    assert json.loads(out.read_text())["status"] == "ok", report["reason"]
    assert report["reference"]["formats"] == ["int8-block", "int8-dynamic", "fine-window"]
    assert report["within_tolerance"] is True, report["violations"]


def test_holds_the_int8_weights_only(tiny_checkpoint):
    """The PyTorch weights the graphs replace are freed (nothing calls them), the embeddings stay, and the record's
    weights count what the process holds: the rest of PyTorch's and each session's int8 weights."""
    model, fp32 = load_variant("finewin+ortint8").model, load_variant("finewin").model
    replaced = 0
    for sub, kept in ((model.semantic, fp32.semantic), (model.coarse_acoustics, fp32.coarse_acoustics)):
        assert all(t.is_meta for name in ort_int8.REPLACED for t in getattr(sub, name).state_dict().values())
        assert not sub.input_embeds_layer.weight.is_meta and not sub.position_embeds_layer.weight.is_meta
        replaced += sum(models.weights_bytes(getattr(kept, name)) for name in ort_int8.REPLACED)
    held = sum(sub.runtime_weight_bytes for sub in (model.semantic, model.coarse_acoustics))
    assert held > 0
    assert models.weights_bytes(model) == models.weights_bytes(fp32) - replaced + held
    assert models.parameter_count(model) == models.parameter_count(fp32)  # the same weights, in another format


def _graphs_held() -> int:
    import gc

    import onnx

    gc.collect()
    return sum(isinstance(o, onnx.ModelProto) for o in gc.get_objects())


def test_holds_no_graph_beside_its_sessions(tiny_checkpoint):
    """The process holds each graph's weights once, in its session: the graph's message (as large as its weights) is
    not kept beside it, where it counted in the run's peak memory. The layers' kernels still run (they read the file
    again on first use)."""
    before = _graphs_held()
    model = load_variant("finewin+ortint8").model
    assert _graphs_held() == before
    for sub in (model.semantic, model.coarse_acoustics):
        name, kernel = next(iter(sub.layer_kernels.items()))
        x = torch.randn(2, sub.get_submodule(name).in_features)
        assert kernel(x).shape == (2, sub.get_submodule(name).out_features)


def test_the_quantized_graph_is_cached_per_weights(tiny_checkpoint, monkeypatch):
    """A second process with the same weights loads the quantized file instead of quantizing again; one changed
    weight is a new file."""
    sub = load_variant("finewin").model.coarse_acoustics
    path = ort_int8.quantized_file(sub, "coarse")
    stamp = path.stat().st_mtime_ns

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def refuse(self):
        raise AssertionError("quantized again")

    monkeypatch.setattr(MatMulNBitsQuantizer, "process", refuse)
    assert ort_int8.quantized_file(sub, "coarse") == path and path.stat().st_mtime_ns == stamp
    with torch.no_grad():
        sub.layers[0].mlp.in_proj.weight[0, 0] += 1.0
    with pytest.raises(AssertionError, match="quantized again"):
        ort_int8.quantized_file(sub, "coarse")
