"""ONNX Runtime's int8 decode for Bark's semantic and coarse models (`ortint8`): what the memory floor asks of a CPU
decode step (read the int8 weights and the keys and values so far once, nothing else), with ONNX Runtime's own
operators.

Each sub-model becomes one graph, built from its weights with `onnx.helper` (quantized once per weights into the
barkbench cache, `quantized_file`): layer norms, the Linear layers as
`MatMulNBits` (int8 weights in blocks of 128 along the input, symmetric, quantized by ONNX Runtime's own
`MatMulNBitsQuantizer`; accuracy level 4: activations quantized to int8 per block and int8 dot products), exact GELU,
and attention as `GroupQueryAttention` (as many key and value heads as query heads) over a key/value buffer per layer
that the graph updates in place (its past and present outputs bound to the same memory): a step reads the cache so
far and writes the new position, where a graph that takes the past and returns it copies the whole cache every step
(on a 2-core AVX2 CPU, bark-small's semantic step: 5.6 ms in place against 10-12 ms through `generate`'s concatenating
cache, with the same int8 weights). Padded keys (left-padded batches) are masked by the attention bias.

`BarkModel.generate` keeps its loops (prompts, windows, logits processing, sampling); only the sub-models' forward
changes. The token and position embeddings stay in PyTorch (gathers). `generate`'s cache then only counts positions
(one value per position): the keys and values live in the buffers, which a call without a past starts again.
Under the device-side loop, the steps after the prompt skip the module forward (`Decoder.step_forward`) and the
buffers alone count their positions. The number format is simulated by `references.int8_block` (the fidelity check's reference).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .ort_runtime import MatmulsAlone, fingerprint, load_graph, release_replaced, session_of, weight_bytes

BLOCK = 128  # MatMulNBits block along the input dimension (the quantizer pads a shorter input to one block)
ACCURACY_LEVEL = 4  # int8 activations per block, int8 dot products (MLAS)
OPSET = 18


def graph(model):
    """The forward after the embeddings of a Bark causal model, in fp32 (`quantized_graph` quantizes its MatMuls)."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    cfg = model.config
    hidden, heads = cfg.hidden_size, cfg.num_heads
    head_dim, n = hidden // heads, len(model.layers)
    inits, nodes = [], []

    def const(name, tensor):
        inits.append(numpy_helper.from_array(tensor.detach().float().contiguous().numpy(), name))
        return name

    def layer_norm(x, ln, name):
        inputs = [x, const(f"{name}.weight", ln.weight)] + ([const(f"{name}.bias", ln.bias)] if ln.bias is not None else [])
        nodes.append(helper.make_node("LayerNormalization", inputs, [f"{name}.out"], axis=-1, epsilon=ln.eps))
        return f"{name}.out"

    def linear(x, lin, name):  # x @ W^T (+ b): MatMul on the transposed weight, which the quantizer turns int8
        # its output is named after the module (`LayerKernels` finds the layer by it)
        nodes.append(helper.make_node("MatMul", [x, const(f"{name}.weight_t", lin.weight.t())], [f"{name}.mm"]))
        if lin.bias is None:
            return f"{name}.mm"
        nodes.append(helper.make_node("Add", [f"{name}.mm", const(f"{name}.bias", lin.bias)], [f"{name}.out"]))
        return f"{name}.out"

    batch, seq, cap = "batch", "sequence", "capacity"
    inputs = [helper.make_tensor_value_info("hidden", T.FLOAT, [batch, seq, hidden]),
              helper.make_tensor_value_info("seqlens_k", T.INT32, [batch]),
              helper.make_tensor_value_info("total_sequence_length", T.INT32, []),
              helper.make_tensor_value_info("attention_bias", T.FLOAT, [batch, 1, seq, "total"])]
    outputs = []
    x = "hidden"
    for i, block in enumerate(model.layers):
        p = f"layers.{i}"
        qkv = linear(layer_norm(x, block.layernorm_1, f"{p}.layernorm_1"), block.attn.att_proj, f"{p}.attn.att_proj")
        inits.append(numpy_helper.from_array(np.array([hidden] * 3, dtype=np.int64), f"{p}.split"))
        nodes.append(helper.make_node("Split", [qkv, f"{p}.split"], [f"{p}.q", f"{p}.k", f"{p}.v"], axis=-1))
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", T.FLOAT, [batch, heads, cap, head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", T.FLOAT, [batch, heads, cap, head_dim]))
        empty = ""
        nodes.append(helper.make_node(
            "GroupQueryAttention", [f"{p}.q", f"{p}.k", f"{p}.v", f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                                    "total_sequence_length", empty, empty, empty, "attention_bias"],
            [f"{p}.attn", f"present_key.{i}", f"present_value.{i}"], domain="com.microsoft", num_heads=heads,
            kv_num_heads=heads, scale=1.0 / float(np.sqrt(head_dim))))
        x_attn = linear(f"{p}.attn", block.attn.out_proj, f"{p}.attn.out_proj")
        nodes.append(helper.make_node("Add", [x, x_attn], [f"{p}.residual"]))
        h = linear(layer_norm(f"{p}.residual", block.layernorm_2, f"{p}.layernorm_2"), block.mlp.in_proj,
                   f"{p}.mlp.in_proj")
        nodes.append(helper.make_node("Gelu", [h], [f"{p}.gelu"], domain="com.microsoft"))  # exact (erf), as nn.GELU
        h = linear(f"{p}.gelu", block.mlp.out_proj, f"{p}.mlp.out_proj")
        nodes.append(helper.make_node("Add", [f"{p}.residual", h], [f"{p}.out"]))
        x = f"{p}.out"
    logits = linear(layer_norm(x, model.layernorm_final, "layernorm_final"), model.lm_head, "lm_head")
    outputs.insert(0, helper.make_tensor_value_info(logits, T.FLOAT, [batch, seq, cfg.output_vocab_size]))
    body = helper.make_graph(nodes, "bark_causal", inputs, outputs, inits)
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])


def quantized_graph(model):
    """The graph with every weight MatMul int8 (MatMulNBits, ONNX Runtime's quantizer)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        quantizer = MatMulNBitsQuantizer(graph(model), bits=8, block_size=BLOCK, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL)
        quantizer.process()
    finally:
        quantizer_log.setLevel(level)
    quantized = quantizer.model.model
    left = [node.name or node.output[0] for node in quantized.graph.node if node.op_type == "MatMul"]
    if left:  # every MatMul of this graph has a constant weight
        raise RuntimeError(f"ONNX Runtime's quantizer left MatMuls in fp32: {left}")
    # A copy of what it holds: the quantizer's message keeps the memory of the fp32 weights it removed (bark-small's
    # semantic graph: 466 MB of process memory for 91 MB of initializers, against 91 MB for the copy)
    return onnx.load_from_string(quantized.SerializeToString())


def quantized_file(model, kind: str) -> Path:
    """`quantized_graph` of a Bark causal model (`kind`: semantic or coarse), written into the barkbench cache the first
    time these weights are seen (atomically). The processes that run it load the file: none quantizes again (bark-small:
    ~10 s for the semantic model, ~2 s for the coarse), none holds the graph's message beside its session."""
    import onnx

    from .cache import build_dir, cache_dir

    key = fingerprint(model, kind, code=(graph, quantized_graph), packages=("onnx", "onnxruntime", "transformers"),
                      settings=f"opset {OPSET} block {BLOCK} accuracy {ACCURACY_LEVEL}")
    target = cache_dir() / "onnx-int8" / f"{kind}-{key}"

    def build(staged: Path) -> None:
        staged.mkdir(parents=True)
        onnx.save(quantized_graph(model), str(staged / "model.onnx"))

    build_dir(target, build, complete="model.onnx")
    return target / "model.onnx"


def session_options(threads: int):
    """`ort_runtime.session_options`, with the intra-op threads spinning within a run and stopped at its end: a decode
    step runs ~120 operators, each handed to the thread pool, and a sleeping worker is woken for each (bark-small's
    semantic step, 2-core AVX2 CPU, alternating steps of two sessions with ~1 ms of PyTorch work between them: 6 %
    faster spinning, in 83 % of 360 pairs), while PyTorch's work between runs still finds the cores free."""
    from .ort_runtime import session_options as plain

    return plain(threads, spin_within_runs=True)


class Decoder:
    """One sub-model's session and its in-place key/value buffers (one per layer and kind, for one batch). `graph`: the
    graph or its file."""

    def __init__(self, model, graph, threads: int):
        import onnxruntime as ort

        source = str(graph) if isinstance(graph, (str, Path)) else graph.SerializeToString()
        self.session = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
        cfg = model.config
        self.layers, self.heads, self.head_dim = len(model.layers), cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.capacity = int(cfg.block_size)  # the position embeddings' length: no sequence is longer
        self.logits, self.vocab = self.session.get_outputs()[0].name, int(cfg.output_vocab_size)
        self.hidden_size = int(cfg.hidden_size)
        self.buffers: list[np.ndarray] = []
        self.binding = None
        self.cache = None  # the generate cache whose positions the buffers hold
        self.length = 0  # how many positions the buffers hold
        self.padded = False  # whether the sequence's prompt has padded keys

    def _bind_buffers(self, batch: int) -> None:
        shape = (batch, self.heads, self.capacity, self.head_dim)
        self.buffers = [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.layers)]
        self.binding = self.session.io_binding()
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                buf = self.buffers[2 * i + j]
                for name in (f"past_{kind}.{i}", f"present_{kind}.{i}"):  # the same memory: updated in place
                    bind = self.binding.bind_input if name.startswith("past") else self.binding.bind_output
                    bind(name, "cpu", 0, np.float32, list(shape), buf.ctypes.data)
        # a one-token step's inputs and logits (`step_forward`), at fixed addresses; a zero bias for unpadded keys
        self.step_hidden = torch.empty(batch, 1, self.hidden_size)
        self.step_logits = torch.empty(batch, 1, self.vocab)
        self.step_seqlens, self.step_total = np.zeros(batch, dtype=np.int32), np.zeros((), dtype=np.int32)
        self.zero_bias = np.zeros(batch * self.capacity, dtype=np.float32)

    def run(self, hidden: torch.Tensor, past_length: int, key_mask: torch.Tensor, cache) -> torch.Tensor:
        b, t = hidden.shape[:2]
        total = past_length + t
        if total > self.capacity:
            raise ValueError(f"{total} positions, past the model's {self.capacity}")
        if past_length == 0:
            if not self.buffers or self.buffers[0].shape[0] != b:
                self._bind_buffers(b)
            self.cache = cache
            self.padded = not bool(key_mask.all())
        else:
            self._check_continues(cache, past_length)
        bias = torch.zeros(b, 1, t, total)
        bias.masked_fill_(~key_mask.bool()[:, None, None, :], torch.finfo(torch.float32).min)
        self.binding.bind_cpu_input("hidden", hidden.detach().float().contiguous().numpy())
        self.binding.bind_cpu_input("seqlens_k", np.full((b,), total - 1, dtype=np.int32))
        self.binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        self.binding.bind_cpu_input("attention_bias", bias.numpy())
        logits = torch.empty(b, t, self.vocab)  # written by the run (its shape changes between calls: bound each time)
        self.binding.bind_output(self.logits, "cpu", 0, np.float32, list(logits.shape), logits.data_ptr())
        self.session.run_with_iobinding(self.binding)
        self.length = total
        return logits

    def _check_continues(self, cache, past_length: int) -> None:
        if cache is None or cache is not self.cache:
            raise RuntimeError("this forward continues the sequence of the generate cache it last started; a past "
                               "from another cache is not in its key/value buffers")
        if past_length != self.length:
            raise RuntimeError(f"the cache counts {past_length} positions, the key/value buffers hold {self.length} "
                               "(a one-token step of the device-side loop does not count its positions in the cache)")

    def step_forward(self, sub, module_forward, cache):
        """The device-side loop's forward (`barkbench.device_decode.ModelForward`: tokens (b, 1), positions (1, 1) ->
        logits (b, V)) for the steps after the prompt that `cache` started: the graph's run of `run`, on inputs bound
        at fixed addresses, without the module forward's per-call tensors, checks and output record (~0.15 ms of a
        ~3.5 ms step, bark-small on a 2-core Zen 5; the same tokens). The buffers count the positions: `cache` keeps
        the prompt's only. The returned logits are overwritten by the next step. None while `sub`'s forward is no
        longer `module_forward` (a wrapper, such as the fidelity check's step recorder, is to see every step)."""
        if vars(sub).get("forward") is not module_forward:
            return None
        token_table, position_table = sub.input_embeds_layer.weight, sub.position_embeds_layer.weight

        def forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            position = self.length
            self._check_continues(cache, position)
            if int(positions) != position:
                raise RuntimeError(f"a step at position {int(positions)} after {position} positions")
            if self.padded:  # device_generate refuses padded prompts: no bias is built here
                raise NotImplementedError("the one-token step runs unpadded sequences only")
            b, total = tokens.shape[0], position + 1
            if total > self.capacity:
                raise ValueError(f"{total} positions, past the model's {self.capacity}")
            # the embeddings as the module forward adds them (a gather each, then one add)
            torch.add(torch.nn.functional.embedding(tokens, token_table), position_table[position],
                      out=self.step_hidden)
            self.step_seqlens[:] = position
            self.step_total[...] = total
            bind = self.binding
            bind.bind_input("hidden", "cpu", 0, np.float32, [b, 1, self.hidden_size], self.step_hidden.data_ptr())
            bind.bind_input("seqlens_k", "cpu", 0, np.int32, [b], self.step_seqlens.ctypes.data)
            bind.bind_input("total_sequence_length", "cpu", 0, np.int32, [], self.step_total.ctypes.data)
            bind.bind_input("attention_bias", "cpu", 0, np.float32, [b, 1, 1, total], self.zero_bias.ctypes.data)
            bind.bind_output(self.logits, "cpu", 0, np.float32, [b, 1, self.vocab], self.step_logits.data_ptr())
            self.session.run_with_iobinding(bind)
            self.length = total
            return self.step_logits[:, -1]

        return forward


def causal_forward(model, decoder: Decoder):
    """A forward for Bark's semantic or coarse model (`BarkCausalModel.forward`'s arguments) that runs `decoder`."""
    cfg = model.config

    @functools.wraps(type(model).forward)
    def forward(input_ids=None, cache=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        if labels is not None or output_attentions or output_hidden_states:
            raise NotImplementedError("the ONNX Runtime int8 forward returns logits and the cache only")
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if inputs_embeds is None:
            inputs_embeds = model.input_embeds_layer(input_ids)
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        b, t = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + t)[None]
        if attention_mask is None:
            attention_mask = torch.ones(b, past_length + t, dtype=torch.long)
        if attention_mask.shape[-1] != past_length + t:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, the cache and the input "
                             f"{past_length + t}")
        hidden = inputs_embeds + model.position_embeds_layer(position_ids)
        logits = decoder.run(hidden, past_length, attention_mask, cache if use_cache else None)
        if use_cache and cache is not None:
            # the cache counts positions only, in its first layer (one value each: `get_seq_length` reads that layer,
            # and transformers reads an empty cache as no positions); the keys and values are in the decoder's buffers
            marks = inputs_embeds.new_zeros(b, 1, t, 1)
            cache.update(marks, marks, 0)
        if return_dict is False:
            return (logits, cache) if use_cache else (logits,)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    return forward


class LayerKernels(dict):
    """Each int8 layer of a graph as ONNX Runtime computes it (its MatMulNBits node, weights and scales, alone in a
    session built on first use; the module's bias added after, as the graph adds it): module name -> kernel on an
    input. The fidelity check's per-layer check reads them, since no PyTorch layer of the sub-model runs. `source`:
    the graph or its file, read again on a kernel's first use (a timed process never uses them)."""

    def __init__(self, sub, graph, source, threads: int):
        import onnx
        from onnx import TensorProto as T
        from onnx import helper

        super().__init__()
        read = functools.cache(functools.partial(load_graph, source))
        for node in graph.graph.node:
            if node.op_type == "MatMulNBits":  # its output keeps the MatMul's name (the quantizer renames the node)
                name = node.output[0].removesuffix(".mm")
                node = onnx.NodeProto.FromString(node.SerializeToString())  # a reference would keep the whole graph
                session = functools.cache(lambda node=node: session_of(
                    [node], [helper.make_tensor_value_info(node.input[0], T.FLOAT, None)],
                    [helper.make_tensor_value_info(node.output[0], T.FLOAT, None)], read(), threads))
                bias = sub.get_submodule(name).bias
                bias = None if bias is None else bias.detach().float().clone()  # the module's weights are freed
                self[name] = functools.partial(self._run, bias, node, session)

    @staticmethod
    @torch.inference_mode()
    def _run(bias, node, session, x: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(session().run(None, {node.input[0]: x.detach().float().contiguous().numpy()})[0])
        return out if bias is None else out + bias


def runs(sub) -> bool:
    """Whether `sub`'s forward runs on an int8 graph of this module."""
    return "int8_graph_source" in vars(sub)


REPLACED = ("layers", "layernorm_final", "lm_head")  # what the graph computes: the embeddings stay in PyTorch


def install(sub, source, threads: int) -> int:
    """Run `sub`'s forward on a quantized graph (`source`: the graph or, as the variant installs it, its file: the
    process then holds the session's weights only); returns its weight bytes (what a decode step reads besides the
    cache), kept on the sub-model for the floor and the record's weights with its layers' kernels."""
    graph = load_graph(source)
    sub.int8_graph_source = source
    sub.runtime_weight_bytes = weight_bytes(graph)
    sub.layer_kernels = LayerKernels(sub, graph, source, threads)
    sub.matmuls_alone = MatmulsAlone(graph, threads, source=source)
    decoder = Decoder(sub, source, threads)
    del graph
    sub.forward = causal_forward(sub, decoder)
    sub.keeps_keys_values = True  # the generate cache only counts positions (barkbench.device_decode reads this)
    sub.step_forward = functools.partial(decoder.step_forward, sub, sub.forward)  # the device-side loop's steps
    # Under the device-side loop, a sampled step's draws are made beside the run: bark-small's step 3.42 -> 3.28 ms on a
    # 2-core Zen 5 (faster in 12 of 12 alternating calls; the same tokens), where torch.ao's int8 forward got slower
    # (5.59 -> 5.64 ms, 1 of 12): its OpenMP threads want both cores, the session's memory-bound run leaves room
    sub.draws_beside_forward = True
    release_replaced(sub, REPLACED)
    return sub.runtime_weight_bytes


def use_ort_int8(model, threads: int) -> dict[str, int]:
    """Run the semantic and coarse models' forward as int8 ONNX Runtime graphs; returns the weight bytes of each."""
    return {kind: install(sub, quantized_file(sub, kind), threads)
            for kind, sub in (("semantic", model.semantic), ("coarse", model.coarse_acoustics))}
