"""A decode loop that stays on the device for Bark's semantic and coarse models (gpt-fast's structure).

Bark's own `generate` code still does everything around the loop (the semantic model's text encoding and
prompt, the coarse model's sliding windows, its codebook offsets and histories); only the inner
`GenerationMixin` loop is replaced, through transformers' `custom_generate` hook: `generate` prepares
the inputs, the logits processors and the stopping criteria exactly as it would for itself, and hands
them to `device_generate`. That function turns the processors Bark uses into a `LogitsProgram` (fixed-
shape tensor ops indexed by a step counter that lives on the device), and runs

    prefill (the prompt, into a pre-allocated StaticCache) -> select -> decode_step x (max_new_tokens - 1)

where one `decode_step` is the model forward on the last token, Bark's logits processing and the choice of
the next token (argmax, or temperature sampling by an exponential race: the draw `torch.multinomial` makes
for one sample, without its host-side validity check). Every buffer it reads or writes has a fixed shape
and address, and nothing in it reads a tensor value on the host (on a CPU, where that costs nothing, the
step count is read as an int), so on CUDA the whole step is captured once into a CUDA graph and replayed.
Stopping at EOS is checked on the host every `STOP_CHECK_EVERY` steps (never when EOS is suppressed for
the whole call, as in barkbench's fixed-length mode); the tokens after the last sequence finished are cut
off as `generate` would never have made them.

Exactness: greedy tokens equal `generate`'s. Sampled tokens use the global RNG in `generate`'s order, so
they are equal under the same seed on CPU, as long as `generate` does not stop early at EOS (a stopping
check every few steps draws for steps `generate` never runs, so later stages' draws shift). The CUDA graph
draws from the CUDA generator at captured offsets: the same distribution, not the same stream.

`decode_step(model_forward, program, state)` knows nothing of Bark's classes: a model exported to another
runtime (ONNX, OpenVINO) can run the same loop with its own `model_forward(tokens, positions) -> logits`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.generation.logits_process import (AlternatingCodebooksLogitsProcessor,
                                                    BarkEosPrioritizerLogitsProcessor, LogitNormalization,
                                                    MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor,
                                                    SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.models.bark.modeling_bark import BarkCoarseModel, BarkSemanticModel

from .static_decode import switch_decoders

STOP_CHECK_EVERY = 32  # decode steps between host checks for "every sequence has ended" (natural length only)

ModelForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens (b,1), positions (1,1)) -> logits (b,V)


@dataclass(frozen=True)
class ProgramSpec:
    """What Bark's logits processors do at a step, as plain values (hashable: it keys a captured graph)."""

    vocab_size: int
    suppressed: tuple[int, ...] = ()  # token ids masked at every step
    alternating: tuple[int, int, int] | None = None  # (semantic_vocab_size, codebook_size, phase offset)
    eos_token_id: int | None = None  # ends a sequence; it is padded with pad_token_id afterwards
    pad_token_id: int | None = None
    eos_masked_steps: int = 0  # EOS masked at steps < this (min_length, min_new_tokens)
    min_eos_p: float | None = None  # Bark's EOS prioritizer
    temperature: float | None = None
    top_k: int | None = None
    renormalize: bool = False  # log_softmax last (LogitNormalization)
    do_sample: bool = False

    @staticmethod
    def from_generate(processors, stopping_criteria, generation_config, prompt_length: int,
                      vocab_size: int) -> tuple["ProgramSpec", int]:
        """The spec of the processors `generate` prepared, and the number of new tokens to make. Refuses a
        processor or stopping criterion it does not implement, or one out of the order it applies them in."""
        fields: dict = {"vocab_size": vocab_size, "do_sample": bool(generation_config.do_sample)}
        suppressed: set[int] = set()
        stage = 0  # masks (0) -> EOS prioritizer (1) -> temperature (2) -> top-k (3) -> normalization (4)

        def at(kind: int, processor) -> None:
            nonlocal stage
            if kind < stage:
                raise NotImplementedError(f"device decode applies {type(processor).__name__} in another order")
            stage = kind

        for p in processors:
            if isinstance(p, SuppressTokensLogitsProcessor):
                at(0, p)
                suppressed.update(int(t) for t in p.suppress_tokens.tolist())
            elif isinstance(p, AlternatingCodebooksLogitsProcessor):
                at(0, p)
                fields["alternating"] = (p.semantic_vocab_size, p.codebook_size,
                                         (prompt_length - p.input_start_len) % 2)
            elif isinstance(p, MinLengthLogitsProcessor):
                at(0, p)
                fields["eos_masked_steps"] = max(fields.get("eos_masked_steps", 0), p.min_length - prompt_length)
                suppress_eos_ids = p.eos_token_id
            elif isinstance(p, MinNewTokensLengthLogitsProcessor):
                at(0, p)
                fields["eos_masked_steps"] = max(fields.get("eos_masked_steps", 0),
                                                 p.prompt_length_to_skip + p.min_new_tokens - prompt_length)
                suppress_eos_ids = p.eos_token_id
            elif isinstance(p, BarkEosPrioritizerLogitsProcessor):
                at(1, p)
                if p.min_eos_p:
                    if p.eos_token_id.numel() != 1:
                        raise NotImplementedError("device decode prioritizes a single EOS token")
                    fields["min_eos_p"] = float(p.min_eos_p)
                    fields["prioritized_eos"] = int(p.eos_token_id.item())
            elif isinstance(p, TemperatureLogitsWarper):
                at(2, p)
                fields["temperature"] = float(p.temperature)
            elif isinstance(p, TopKLogitsWarper):
                at(3, p)
                if p.filter_value != -float("inf"):
                    raise NotImplementedError("device decode filters top-k with -inf only")
                fields["top_k"] = min(int(p.top_k), vocab_size)
            elif isinstance(p, LogitNormalization):
                at(4, p)
                fields["renormalize"] = True
            else:
                raise NotImplementedError(f"device decode does not implement {type(p).__name__}")
        max_length = None
        for c in stopping_criteria:
            if isinstance(c, MaxLengthCriteria):
                max_length = c.max_length
            elif not isinstance(c, EosTokenCriteria):
                raise NotImplementedError(f"device decode does not implement the stopping criterion {type(c).__name__}")
        if max_length is None:
            raise NotImplementedError("device decode needs a maximum length")
        eos = generation_config._eos_token_tensor
        if eos is not None:
            if eos.numel() != 1:
                raise NotImplementedError("device decode ends sequences at a single EOS token")
            fields["eos_token_id"] = int(eos.reshape(-1)[0])
            pad = generation_config._pad_token_tensor
            fields["pad_token_id"] = int(pad) if pad is not None else fields["eos_token_id"]
        if fields.get("eos_masked_steps", 0) > 0:
            ids = suppress_eos_ids.reshape(-1).tolist()
            if eos is None or ids != [fields["eos_token_id"]]:
                raise NotImplementedError("device decode masks the EOS token of the generation config only")
        if "prioritized_eos" in fields and fields.pop("prioritized_eos") != fields.get("eos_token_id"):
            raise NotImplementedError("device decode prioritizes the EOS token of the generation config only")
        fields["eos_masked_steps"] = max(0, fields.get("eos_masked_steps", 0))
        if eos is not None and fields["eos_masked_steps"] >= max_length - prompt_length:
            # EOS masked at every step of the call (barkbench's fixed-length mode): a suppressed token, which the
            # prioritizer never picks (p(EOS) = 0): the same scores, without their per-step ops (8 of ~27)
            suppressed.add(fields["eos_token_id"])
            fields.pop("min_eos_p", None)
        fields["suppressed"] = tuple(sorted(suppressed))
        return ProgramSpec(**fields), max_length - prompt_length


class LogitsProgram:
    """Bark's logits processing for a step number held on the device: fixed shapes, no host reads."""

    def __init__(self, spec: ProgramSpec, device: torch.device):
        self.spec = spec
        banned = torch.zeros(2, spec.vocab_size, dtype=torch.bool)  # row: step parity (+ offset)
        banned[:, list(spec.suppressed)] = True
        self.offset = 0
        if spec.alternating:
            semantic_vocab, codebook, self.offset = spec.alternating
            banned[0, :semantic_vocab] = banned[0, semantic_vocab + codebook:] = True  # first codebook
            banned[1, :semantic_vocab + codebook] = True  # second codebook
        self.banned = banned.to(device)
        self.eos = torch.zeros(spec.vocab_size, dtype=torch.bool)
        if spec.eos_token_id is not None:
            self.eos[spec.eos_token_id] = True
        self.eos = self.eos.to(device)
        # A sequence can end only if EOS can be chosen: not when it is suppressed at every step (fixed length), where
        # neither the step mask nor the end-of-sequence bookkeeping has anything to do
        self.ends = spec.eos_token_id is not None and spec.eos_token_id not in spec.suppressed
        self.eos_masked_steps = spec.eos_masked_steps if self.ends else 0

    def scores(self, logits: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
        """Processed scores of float32 logits (b, V) at `step` (a (1,) long tensor on the device; on a CPU, where
        reading it costs nothing, the int), as generate's processors."""
        spec = self.spec
        if isinstance(step, int):
            banned = self.banned[(step + self.offset) % 2]
            if self.eos_masked_steps and step < self.eos_masked_steps:
                banned = banned | self.eos
        else:
            banned = self.banned.index_select(0, (step + self.offset) % 2)  # (1, V)
            if self.eos_masked_steps:
                banned = banned | (self.eos & (step < self.eos_masked_steps))
        scores = logits.masked_fill(banned, -float("inf"))
        if spec.min_eos_p:
            eos = spec.eos_token_id
            probs = torch.nn.functional.softmax(scores.float(), dim=-1)
            only_eos = torch.full_like(scores, -float("inf"))
            only_eos[:, eos] = scores[:, eos]
            stop = probs[:, eos:eos + 1] > spec.min_eos_p
            scores = torch.where(stop, only_eos, scores)
        if spec.temperature is not None:
            scores = scores.div_(spec.temperature)  # in place: `scores` is this step's own tensor
        if spec.top_k is not None:
            scores = scores.masked_fill(scores < torch.topk(scores, spec.top_k)[0][..., -1, None], -float("inf"))
        if spec.renormalize:
            scores = scores.log_softmax(dim=-1)
        return scores

    def noise(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The exponential draws of one sampled step: what torch.multinomial(probs, 1) draws for float32 (b, V) probs."""
        return torch.empty(batch_size, self.spec.vocab_size, device=device).exponential_(1)

    def choose(self, scores: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Next tokens (b,): argmax, or a draw from softmax(scores) that consumes the RNG as
        torch.multinomial(probs, 1) does (an exponential race), without its host-side check. `noise`: this step's
        draws, made beforehand (`noise`); None: drawn here."""
        if not self.spec.do_sample:
            return torch.argmax(scores, dim=-1)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        if noise is None:
            noise = torch.empty_like(probs).exponential_(1)
        return torch.argmax(probs.div_(noise), dim=-1)


@dataclass
class DecodeState:
    """The loop's buffers, fixed in shape and address for a (batch, length): what a CUDA graph replays on."""

    token: torch.Tensor  # (b,) the last token
    position: torch.Tensor  # (1, 1) its position
    step: torch.Tensor  # (1,) index of the token being chosen
    unfinished: torch.Tensor  # (b,) bool
    live_steps: torch.Tensor  # (1,) steps taken while some sequence had not ended
    out: torch.Tensor  # (b, max_new_tokens) chosen tokens

    @staticmethod
    def empty(batch_size: int, max_new_tokens: int, device: torch.device) -> "DecodeState":
        long = {"dtype": torch.long, "device": device}
        return DecodeState(torch.zeros(batch_size, **long), torch.zeros(1, 1, **long), torch.zeros(1, **long),
                           torch.ones(batch_size, dtype=torch.bool, device=device), torch.zeros(1, **long),
                           torch.zeros(batch_size, max_new_tokens, **long))

    def start(self, prompt_length: int) -> None:
        self.position.fill_(prompt_length)
        self.step.zero_()
        self.unfinished.fill_(True)
        self.live_steps.zero_()


def select(logits: torch.Tensor, program: LogitsProgram, state: DecodeState, noise: torch.Tensor | None = None) -> None:
    """Choose the token of `state.step` from its logits (and `noise`, its draws if made beforehand) and advance the
    state (in place). On a CPU the step count is read on the host: no device to wait for, and the index ops of a
    device-side count were ~0.09 ms of a 3.4 ms step (`ortint8`, bark-small, 2-core Zen 5)."""
    step = int(state.step) if state.step.device.type == "cpu" else state.step
    tokens = program.choose(program.scores(logits, step), noise)
    spec = program.spec
    if program.ends:
        tokens = torch.where(state.unfinished, tokens, spec.pad_token_id)
        state.live_steps.add_(state.unfinished.any().long())
        state.unfinished.logical_and_(tokens != spec.eos_token_id)
    if isinstance(step, int):
        state.out[:, step] = tokens
    else:
        state.out.index_copy_(1, step, tokens[:, None])
    state.token.copy_(tokens)
    state.step.add_(1)


@functools.cache
def _draw_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="barkbench-draws")


def decode_step(model_forward: ModelForward, program: LogitsProgram, state: DecodeState,
                draw_beside: bool = False) -> None:
    """One decode step: forward of the last token, Bark's logits processing, the next token; in place.
    `draw_beside` (CPU, sampling): the step's random draws are made by another thread while the forward runs. The RNG
    is consumed in the same order (a forward in eval mode draws nothing), so the tokens are the same."""
    noise = None
    if draw_beside and program.spec.do_sample:
        noise = _draw_thread().submit(program.noise, state.token.shape[0], state.token.device)
    logits = model_forward(state.token[:, None], state.position)
    state.position.add_(1)
    select(logits, program, state, None if noise is None else noise.result())


class CudaGraphStep:
    """`step()` captured once into a CUDA graph (after warm-up on a side stream, as torch.cuda.graphs
    documents); `__call__` replays it. The caller resets the state after capture: warm-up ran real steps."""

    def __init__(self, step: Callable[[], None]):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()
        self.replays = 0

    def __call__(self) -> None:
        self.graph.replay()
        self.replays += 1


@dataclass
class Decoder:
    """One sub-model's loop for a (batch, cache length, program): cache, state and (on CUDA) its graph."""

    cache: StaticCache | DynamicCache
    program: LogitsProgram
    state: DecodeState
    step: Callable[[], None]


def model_forward_of(model, cache: StaticCache | DynamicCache) -> ModelForward:
    def forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=tokens, cache=cache, position_ids=positions, use_cache=True, return_dict=True)
        return out.logits[:, -1].float()

    return forward


class DeviceDecoding:
    """Mixin for a Bark causal sub-model: its inner generate loop runs `device_generate`."""

    use_cuda_graph: bool = True  # on a CUDA device; off: the same step, launched eagerly
    # Set on a sub-model whose forward keeps the keys and values in its own buffers (barkbench.ort_int8).
    keeps_keys_values: bool = False
    # Set on a sub-model with a one-token forward of its own for the loop's steps (cache -> ModelForward, or None
    # where the module's forward must see each step; barkbench.ort_int8); otherwise the steps call the module
    # (`model_forward_of`).
    step_forward: Callable[[StaticCache | DynamicCache], ModelForward | None] | None = None
    # Set on a sub-model whose CPU forward leaves room for a step's random draws beside it (decode_step's
    # `draw_beside`; barkbench.ort_int8, where it was measured to pay).
    draws_beside_forward: bool = False
    # Called with True before the prefill and False before each decode step (and the cache positions the step's
    # attention reads), on a CPU only (a CUDA step returns before
    # its work is done: a host clock per step would time launches): the stage tracker's step marks.
    step_marks: Callable[[bool, int], None] | None = None

    def _graphed(self) -> bool:
        # A forward replaced on the instance (a step recorder, a compiled forward) is called at every step, uncaptured.
        return self.device.type == "cuda" and self.use_cuda_graph and "forward" not in vars(self)

    def _decoder(self, batch_size: int, cache_length: int, out_length: int, spec: ProgramSpec) -> Decoder:
        device = self.device
        graphed = self._graphed()
        # Kept while the key matches: a CUDA graph replays against these very buffers.
        # (and the instance's forward: one replaced since, such as a step recorder, is called at every step)
        key = (batch_size, cache_length, out_length, spec, torch.is_inference_mode_enabled(), graphed,
               vars(self).get("forward"))
        held = getattr(self, "_device_decoder", None)
        if held is not None and held[0] == key:
            held[1].cache.reset()
            return held[1]
        # A forward that keeps the keys and values in its own buffers (barkbench.ort_int8) reads only the position
        # count from the cache: a DynamicCache of one value per position, instead of a static cache it never reads.
        cache = (DynamicCache(config=self.config) if self.keeps_keys_values
                 else StaticCache(config=self.config, max_cache_len=cache_length))
        program = LogitsProgram(spec, device)
        state = DecodeState.empty(batch_size, out_length, device)
        forward = (self.step_forward and self.step_forward(cache)) or model_forward_of(self, cache)
        draw_beside = self.draws_beside_forward and device.type == "cpu"

        def step():
            decode_step(forward, program, state, draw_beside)

        if graphed:
            step = CudaGraphStep(step)
            cache.reset()
        decoder = Decoder(cache, program, state, step)
        self._device_decoder = (key, decoder)
        return decoder

    def _device_cache_length(self, prompt_length: int, max_new_tokens: int) -> int:
        return prompt_length + max_new_tokens

    def _device_out_length(self, max_new_tokens: int) -> int:
        return max_new_tokens


def device_generate(model, input_ids, logits_processor, stopping_criteria, generation_config,
                    synced_gpus=False, streamer=None, inputs_embeds=None, **model_kwargs):
    """`custom_generate` for a `DeviceDecoding` sub-model: the prepared inputs in, the sequences out
    (prompt ids followed by the new tokens, as `GenerationMixin.generate` returns them)."""
    if generation_config.return_dict_in_generate or streamer is not None or synced_gpus:
        raise NotImplementedError("device decode returns plain sequences (no dict, streamer or synced GPUs)")
    if generation_config.num_beams != 1:
        raise NotImplementedError("device decode does not implement beam search")
    if model_kwargs.get("attention_mask") is not None and not bool(model_kwargs["attention_mask"].all()):
        raise NotImplementedError("device decode runs Bark's unmasked prompts only")
    batch_size, prompt_length = input_ids.shape
    spec, max_new_tokens = ProgramSpec.from_generate(logits_processor, stopping_criteria, generation_config,
                                                     prompt_length, model.config.output_vocab_size)
    decoder = model._decoder(batch_size, model._device_cache_length(prompt_length, max_new_tokens),
                             model._device_out_length(max_new_tokens), spec)
    state, program = decoder.state, decoder.program
    state.start(prompt_length)
    mark = model.step_marks if model.device.type == "cpu" else None
    if mark:
        mark(True, batch_size * prompt_length)
    positions = torch.arange(prompt_length, device=input_ids.device)[None]
    prompt = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
    logits = model(**prompt, cache=decoder.cache, position_ids=positions, use_cache=True,
                   return_dict=True).logits[:, -1].float()
    select(logits, program, state)
    stops_early = program.ends and spec.eos_masked_steps < max_new_tokens
    for i in range(1, max_new_tokens):
        if stops_early and i % STOP_CHECK_EVERY == 0 and not bool(state.unfinished.any()):
            break
        if mark:  # step i attends to the prompt and the i tokens made so far
            mark(False, batch_size * (prompt_length + i))
        decoder.step()
    made = int(state.live_steps) if program.ends else max_new_tokens
    return torch.cat([input_ids, state.out[:, :made]], dim=-1)


class DeviceBarkSemanticModel(DeviceDecoding, BarkSemanticModel):
    def generate(self, input_ids, semantic_generation_config=None, history_prompt=None, attention_mask=None,
                 **kwargs):
        kwargs.setdefault("custom_generate", device_generate)
        return super().generate(input_ids, semantic_generation_config, history_prompt, attention_mask, **kwargs)


class DeviceBarkCoarseModel(DeviceDecoding, BarkCoarseModel):
    def generate(self, semantic_output, semantic_generation_config=None, coarse_generation_config=None,
                 codebook_size=1024, history_prompt=None, return_output_lengths=None, **kwargs):
        kwargs.setdefault("custom_generate", device_generate)
        if coarse_generation_config is not None and semantic_generation_config is not None:
            from .static_decode import coarse_cache_length

            # One cache for every window of the call (the prompt grows with the coarse history): one graph.
            self._window_cache_length = coarse_cache_length(semantic_output.shape[-1], semantic_generation_config,
                                                            coarse_generation_config)
            self._window_tokens = coarse_generation_config.sliding_window_len
        return super().generate(semantic_output, semantic_generation_config, coarse_generation_config,
                                codebook_size, history_prompt, return_output_lengths, **kwargs)

    def _device_cache_length(self, prompt_length: int, max_new_tokens: int) -> int:
        return max(getattr(self, "_window_cache_length", 0), prompt_length + max_new_tokens)

    def _device_out_length(self, max_new_tokens: int) -> int:
        # the last window is shorter: it reuses the buffers (and graph) of the full ones
        return max(getattr(self, "_window_tokens", 0), max_new_tokens)


DEVICE_CLASSES = {BarkSemanticModel: DeviceBarkSemanticModel, BarkCoarseModel: DeviceBarkCoarseModel}


def use_device_decode(model) -> list[torch.nn.Module]:
    """Switch the semantic and coarse sub-models of a BarkModel to the device-side loop; returns them."""
    return switch_decoders(model, DEVICE_CLASSES, "the device-side decode loop")
