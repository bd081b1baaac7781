"""ONNX Runtime as the CPU runtime of Bark's three transformers (`ort`): each sub-model exported to ONNX, run by
ONNX Runtime's CPU execution provider.

What runs where: `BarkModel.generate` keeps its own loops (Bark's prompts, windows, logits processing and
sampling), so only the sub-models' forward changes, and every other variant's loop and bookkeeping stay
comparable. The token embeddings stay in PyTorch (a gather); ONNX Runtime runs the rest of each forward: position
embeddings, every block, the final norm and the language-model head.

- semantic and coarse: one graph per sub-model, `(inputs_embeds, position_ids, attention_mask, past keys and
  values of every layer) -> (logits, this call's keys and values)`. The past comes from, and the new keys
  and values go to, the `DynamicCache` that `generate` passes (its `update` concatenates, as in PyTorch), so the
  same graph serves the prefill (an empty past) and every decode step. Attention is causal from the position
  in the cache, plus the key padding mask (the fidelity check's left-padded batch).
- fine: `(inputs_embeds, codebook head index) -> logits` over any window length (so `finewin` works unchanged).

Export: `torch.onnx.export` (dynamo) of small wrapper modules that call Bark's own submodules (norms, projections,
MLP) and write the attention out (causal mask from the past length), with dynamic batch and lengths. The graphs
are exported in memory at load time, once per process (not timed) and handed to ONNX Runtime as bytes, so
nothing is cached on disk. fp32 throughout, with the job's intra-op thread count and ONNX Runtime's full graph
optimizations (fused attention, GELU and layer norm where it finds them).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput

AUTO = torch.export.Dim.AUTO


def unavailable_reason() -> str | None:
    """Why ONNX Runtime cannot run here (None: it can): under an instruction-set ceiling (checked each time: the
    ceiling is this process's environment), or the runtime, the exporter's packages and the CPU provider (once)."""
    from .isa import uncappable_reason

    return uncappable_reason("ONNX Runtime (MLAS)") or _runtime_problem()


@functools.cache
def _runtime_problem() -> str | None:
    try:
        import onnx  # noqa: F401  (the exporter needs it, and onnxscript)
        import onnxruntime as ort
        import onnxscript  # noqa: F401

        if "CPUExecutionProvider" not in ort.get_available_providers():
            return "not applicable here: ONNX Runtime has no CPU execution provider"
    except Exception as exc:
        return f"not applicable here: ONNX Runtime or the ONNX exporter is not usable ({type(exc).__name__}: {exc})"[:300]
    return None


def _attention(block, hidden, past_key, past_value, key_mask):
    """Bark's attention (eager arithmetic: scaled scores, causal and padding mask, softmax) of `hidden` against
    the past keys and values; returns the output and this call's keys and values."""
    attn = block.attn
    b, t, _ = hidden.shape
    q, k, v = attn.att_proj(hidden).split(attn.embed_dim, dim=2)
    q, k, v = (z.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2) for z in (q, k, v))
    keys, values = (k, v) if past_key is None else (torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2))
    scores = torch.matmul(q, keys.transpose(-1, -2)) * (1.0 / math.sqrt(attn.head_dim))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, values).transpose(1, 2).reshape(b, t, attn.embed_dim)
    return attn.out_proj(out), k, v


def _block(block, hidden, past_key, past_value, key_mask):
    attn_out, k, v = _attention(block, block.layernorm_1(hidden), past_key, past_value, key_mask)
    hidden = hidden + attn_out
    return hidden + block.mlp(block.layernorm_2(hidden)), k, v


class CausalGraph(nn.Module):
    """What ONNX Runtime runs for Bark's semantic or coarse model: the forward after the token embeddings."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        m = self.model
        n = len(m.layers)
        hidden = inputs_embeds + m.position_embeds_layer(position_ids)
        t, total = inputs_embeds.shape[1], attention_mask.shape[1]
        # query i (at cache position total - t + i) sees key j <= total - t + i, and only unpadded keys
        causal = (torch.arange(total)[None, :] <= (torch.arange(t) + (total - t))[:, None])
        key_mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        new = []
        for i, block in enumerate(m.layers):
            hidden, k, v = _block(block, hidden, past[i], past[n + i], key_mask)
            new.append((k, v))
        logits = m.lm_head(m.layernorm_final(hidden))
        return (logits, *[k for k, _ in new], *[v for _, v in new])


class FineGraph(nn.Module):
    """What ONNX Runtime runs for Bark's fine model: the forward after the summed codebook embeddings, with the
    head of the predicted codebook picked by index (the heads stacked into one weight)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.heads = nn.Parameter(torch.stack([h.weight for h in model.lm_heads]).transpose(1, 2).detach(),
                                  requires_grad=False)

    def forward(self, inputs_embeds, head):
        m = self.model
        t = inputs_embeds.shape[1]
        hidden = inputs_embeds + m.position_embeds_layer(torch.arange(t)[None])
        for block in m.layers:
            hidden, _, _ = _block(block, hidden, None, None, None)
        return torch.matmul(m.layernorm_final(hidden), self.heads[head])


# --- export, once per weights (cached), and the ONNX Runtime session ----------------------------------------

EXPORT_OPSET = 18


def fingerprint(module: nn.Module, kind: str, code=None, packages=("torch", "onnx", "onnxscript", "transformers"),
                 settings: str = f"opset {EXPORT_OPSET}") -> str:
    """What a graph built from `module` depends on: its weights and config, the code that builds it (`code`; by
    default this module's export) and settings, and the versions of `packages`."""
    import importlib.metadata as md

    h = hashlib.sha256(settings.encode())
    for part in code or (_attention, _block, CausalGraph, FineGraph, _example_inputs):  # what the graph is made of
        h.update(inspect.getsource(part).encode())
    for package in packages:
        h.update(f"{package}={md.version(package)}".encode())
    h.update(f"{kind}:{module.config.to_json_string()}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().data)
    return h.hexdigest()[:24]


def _example_inputs(module: nn.Module, kind: str):
    """Small inputs whose every dynamic size differs from the others (batch 3, past 4, new tokens 5): each
    becomes its own symbol, so the graph serves any batch, past and length."""
    cfg = module.config
    embeds = torch.randn(3, 5, cfg.hidden_size)
    if kind == "fine":
        return (embeds, torch.tensor(0)), ({0: AUTO, 1: AUTO}, None)
    heads = cfg.num_heads
    past = tuple(torch.randn(3, heads, 4, cfg.hidden_size // heads) for _ in range(2 * len(module.layers)))
    args = (embeds, torch.arange(4, 9)[None].expand(3, 5), torch.ones(3, 9, dtype=torch.long), *past)
    # the varargs past travel as one tuple in `dynamic_shapes`
    shapes = ({0: AUTO, 1: AUTO}, {0: AUTO, 1: AUTO}, {0: AUTO, 1: AUTO}, tuple({0: AUTO, 2: AUTO} for _ in past))
    return args, shapes


def exported(module: nn.Module, kind: str) -> Path:
    """The ONNX file of one sub-model (`kind`: semantic, coarse or fine), exported into the barkbench cache the
    first time these weights are seen (atomically: a half-written export is never used)."""
    from .cache import build_dir, cache_dir

    target = cache_dir() / "onnx" / f"{kind}-{fingerprint(module, kind)}"
    graph = (FineGraph if kind == "fine" else CausalGraph)(module).eval()

    def build(staged: Path) -> None:
        args, shapes = _example_inputs(module, kind)
        # the exporter logs one warning per torchvision operator it cannot register (torchvision is not needed)
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registration.level
        registration.setLevel(logging.ERROR)
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=shapes,
                                            opset_version=EXPORT_OPSET, optimize=True, verbose=False)
        finally:
            registration.setLevel(level)
        staged.mkdir(parents=True)
        program.save(str(staged / "model.onnx"))

    build_dir(target, build, complete="model.onnx")
    return target / "model.onnx"


def session(path: Path, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def session_options(threads: int, spin_within_runs: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the job's thread count, as torch's
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle intra-op threads sleep instead of spinning: between two runs PyTorch works on the same cores (Bark's
    # logits processing, sampling, the cache), and spinning threads took them (a bark-small decode step with
    # PyTorch's per-step work between runs: 49 ms spinning against 30 ms not, on 2 cores).
    # `spin_within_runs` (barkbench.ort_int8's decode steps): spinning while a run lasts, stopped at its end.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_within_runs else "0")
    if spin_within_runs:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def _numpy(tensor: torch.Tensor):
    return tensor.detach().contiguous().numpy()


# --- the sub-models' forward, run by ONNX Runtime ------------------------------------------------------------

def causal_forward(model, runner):
    """A forward for Bark's semantic or coarse model (`BarkCausalModel.forward`'s arguments) that runs `runner`."""
    names = [i.name for i in runner.get_inputs()]
    n_layers = len(model.layers)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_heads

    @functools.wraps(type(model).forward)
    def forward(input_ids=None, cache=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        if labels is not None or output_attentions or output_hidden_states:
            raise NotImplementedError("the ONNX Runtime forward returns logits and the cache only")
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
        position_ids = position_ids.expand(b, t)  # the graph's positions are per row
        if attention_mask is None:
            attention_mask = torch.ones(b, past_length + t, dtype=torch.long)
        if attention_mask.shape[-1] != past_length + t:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, the cache and the input "
                             f"{past_length + t}")
        empty = inputs_embeds.new_zeros(b, cfg.num_heads, 0, head_dim)
        past = [empty] * (2 * n_layers)
        if past_length:
            for i, layer in enumerate(cache.layers):
                past[i], past[n_layers + i] = layer.keys, layer.values
        feeds = [inputs_embeds.float(), position_ids.long(), attention_mask.long(), *past]
        logits, *new = runner.run(None, {name: _numpy(x) for name, x in zip(names, feeds)})
        if use_cache and cache is not None:
            for i in range(n_layers):
                cache.update(torch.from_numpy(new[i]), torch.from_numpy(new[n_layers + i]), i)
        logits = torch.from_numpy(logits)
        if return_dict is False:
            return (logits, cache) if use_cache else (logits,)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    return forward


def fine_forward(model, runner):
    """A forward for Bark's fine model (`BarkFineModel.forward`'s arguments) that runs `runner`."""
    names = [i.name for i in runner.get_inputs()]
    given = model.config.n_codes_given

    @functools.wraps(type(model).forward)
    def forward(codebook_idx, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        if labels is not None or output_attentions or output_hidden_states or attention_mask is not None \
                or position_ids is not None:
            raise NotImplementedError("the ONNX Runtime fine forward takes codes or embeddings, and returns logits")
        if codebook_idx == 0:
            raise ValueError("Cannot predict 0th codebook - 0th codebook should be predicted by the coarse model")
        if inputs_embeds is None:  # as BarkFineModel.forward: the sum of the codebooks' embeddings up to this one
            inputs_embeds = torch.cat([layer(input_ids[:, :, i]).unsqueeze(-1)
                                       for i, layer in enumerate(model.input_embeds_layers)], dim=-1)
            inputs_embeds = inputs_embeds[:, :, :, :codebook_idx + 1].sum(dim=-1)
        head = torch.tensor(codebook_idx - given, dtype=torch.long)
        (logits,) = runner.run(None, {names[0]: _numpy(inputs_embeds.float()), names[1]: _numpy(head)})
        logits = torch.from_numpy(logits)
        return MaskedLMOutput(logits=logits) if return_dict is not False else (logits,)

    return forward


# What each graph computes, freed from PyTorch once its session runs: all but the token embeddings, which stay (a gather)
REPLACED = {"semantic": ("position_embeds_layer", "layers", "layernorm_final", "lm_head"),
            "fine": ("position_embeds_layer", "layers", "layernorm_final", "lm_heads")}
REPLACED["coarse"] = REPLACED["semantic"]


def read_bytes(graph) -> int:
    """Bytes of the graph's initializers a decode step reads: all but the tables it only gathers rows from (the
    position embeddings: one row per token)."""
    from onnx import numpy_helper

    uses: dict[str, set] = {}
    for n in graph.graph.node:
        for i, name in enumerate(n.input):
            uses.setdefault(name, set()).add("gathered" if n.op_type == "Gather" and i == 0 else n.op_type)
    return int(sum(numpy_helper.to_array(t).nbytes for t in graph.graph.initializer
                   if uses.get(t.name) != {"gathered"}))


def use_ort(model, threads: int) -> dict[str, Path]:
    """Run the semantic, coarse and fine models' forward in ONNX Runtime; returns the ONNX file of each. The PyTorch
    weights each graph replaces are freed: kept, bark-small's process held its fp32 weights twice (peak memory
    3.4-3.7 GB against eager's 2.3). The sub-models keep what the floors and records need: the weights their session
    holds and a decode step reads, and their matmuls alone in this runtime."""
    import onnx

    files = {}
    for kind, sub, make in (("semantic", model.semantic, causal_forward), ("coarse", model.coarse_acoustics,
                            causal_forward), ("fine", model.fine_acoustics, fine_forward)):
        files[kind] = exported(sub, kind)
        sub.forward = make(sub, session(files[kind], threads))
        graph = onnx.load(str(files[kind]))
        sub.runtime_weight_bytes, sub.runtime_read_bytes = weight_bytes(graph), read_bytes(graph)
        sub.matmuls_alone = MatmulsAlone(graph, threads, source=files[kind])
        del graph
        release_replaced(sub, REPLACED[kind])
    return files


# --- what the floors and records ask of a graph (`ort` and `ortint8`) ---------------------------------------------

def load_graph(source):
    """A graph (`onnx.ModelProto`) from itself or its file."""
    import onnx

    return onnx.load(str(source)) if isinstance(source, (str, Path)) else source


def weight_bytes(graph) -> int:
    """Bytes of the graph's initializers (what its session holds)."""
    from onnx import numpy_helper

    return int(sum(numpy_helper.to_array(t).nbytes for t in graph.graph.initializer))


def weight_matmuls(graph) -> list:
    """The graph's weight matmuls, with the input features of each: `MatMulNBits` (int8), and `MatMul` on a constant
    2-D weight (fp32, the exported graphs of `use_ort`). Attention's matmuls (two computed inputs) are not."""
    initializers = {t.name: t for t in graph.graph.initializer}
    out = []
    for n in graph.graph.node:
        if n.op_type == "MatMulNBits":
            out.append((n, next(a.i for a in n.attribute if a.name == "K")))
        elif n.op_type == "MatMul" and len(getattr(initializers.get(n.input[1]), "dims", ())) == 2:
            out.append((n, int(initializers[n.input[1]].dims[0])))
    return out


def release_replaced(sub, names) -> None:
    """Free the PyTorch modules `names` of `sub` whose weights a graph holds: nothing calls them any more, and kept
    they made the process hold its weights twice (`ortint8`: bark-small's fp32 semantic and coarse weights, ~0.6 GB,
    beside the int8 ones it reads). They stay on the meta device: shapes without memory (the modules' structure
    still names the layers, and the floors count their sizes)."""
    for name in names:
        getattr(sub, name).to("meta")


def session_of(nodes, inputs, outputs, graph, threads: int):
    """A session that runs `nodes` of `graph` alone (with the initializers they read; intra-op threads spinning within
    its runs, as `ort_int8`'s); nothing of it is kept."""
    import onnxruntime as ort
    from onnx import helper

    used = {name for n in nodes for name in n.input}
    body = helper.make_graph(nodes, "kernels", inputs, outputs, [t for t in graph.graph.initializer if t.name in used])
    model = helper.make_model(body, opset_imports=list(graph.opset_import))
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, spin_within_runs=True),
                                providers=["CPUExecutionProvider"])


class MatmulsAlone:
    """The graph's weight matmuls (`weight_matmuls`) alone in one graph, each on an input of its own: one run is what
    a decode step's matmuls cost in this runtime, without the ops between them (`calibration.decode_matmuls_seconds`,
    for `ort` and `ortint8`). Built when timed and dropped after, so the timed calls' memory does not hold a second copy of the weights.
    `source`: the graph or its file (`load_graph`); a file is read again when timed instead of kept (an fp32 graph
    holds every weight)."""

    def __init__(self, graph, threads: int, source=None):
        self.source, self.threads = (graph if source is None else source), threads
        self.count = len(weight_matmuls(graph))

    def step(self, rows: int):
        """One run of every matmul on `rows` random rows."""
        from onnx import TensorProto as T
        from onnx import helper

        source = load_graph(self.source)
        nodes, features = [], set()
        for n, k in weight_matmuls(source):
            features.add(k)
            nodes.append(helper.make_node(n.op_type, [f"x{k}", *n.input[1:]], list(n.output), name=n.name,
                                          domain=n.domain,
                                          **{a.name: helper.get_attribute_value(a) for a in n.attribute}))
        session = session_of(nodes, [helper.make_tensor_value_info(f"x{k}", T.FLOAT, ["rows", k]) for k in features],
                              [helper.make_tensor_value_info(n.output[0], T.FLOAT, None) for n in nodes],
                              source, self.threads)
        feeds = {f"x{k}": np.random.default_rng(0).standard_normal((rows, k), dtype=np.float32) for k in features}
        return lambda: session.run(None, feeds)
