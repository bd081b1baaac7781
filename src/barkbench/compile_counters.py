"""What torch.compile did during a block of calls: CUDA graph replays, CUDA graph skips with their reasons,
and graphs dynamo compiled (after the warm-up: recompiles). Evidence that "reduce-overhead" engaged, rather
than a note that says it was asked for.

Replays are counted at `torch.cuda.CUDAGraph.replay` (inductor's cudagraph trees replay through it), skips
and their messages at inductor's `cudagraph_skips` counter and its cudagraphs log, compiled graphs at
dynamo's `stats.unique_graphs` counter."""
from __future__ import annotations

from contextlib import contextmanager

import torch


class _SkipLog:
    """Stands in for inductor's cudagraphs logger during a block: keeps each skip message, then forwards."""

    def __init__(self, logger, messages: list[str]):
        self._logger, self._messages = logger, messages

    def warning(self, msg, *args, **kwargs):
        self._messages.append(str(msg) % args if args else str(msg))
        return self._logger.warning(msg, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._logger, name)


@contextmanager
def counting():
    """Yields a dict filled when the block ends: cuda_graph_replays, cuda_graph_skips,
    cuda_graph_skip_reasons (distinct messages) and graphs_compiled."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_utils

    found: dict = {}
    replays = [0]
    messages: list[str] = []
    skips0, graphs0 = counters["inductor"]["cudagraph_skips"], counters["stats"]["unique_graphs"]
    replay = torch.cuda.CUDAGraph.replay
    logger = cudagraph_utils.cudagraphs_log

    def counted_replay(self, *args, **kwargs):
        replays[0] += 1
        return replay(self, *args, **kwargs)

    torch.cuda.CUDAGraph.replay = counted_replay
    cudagraph_utils.cudagraphs_log = _SkipLog(logger, messages)
    try:
        yield found
    finally:
        torch.cuda.CUDAGraph.replay = replay
        cudagraph_utils.cudagraphs_log = logger
        found.update(cuda_graph_replays=replays[0],
                     cuda_graph_skips=counters["inductor"]["cudagraph_skips"] - skips0,
                     cuda_graph_skip_reasons=list(dict.fromkeys(messages)),
                     graphs_compiled=counters["stats"]["unique_graphs"] - graphs0)


def summary(warmup: dict, timed: dict, timed_calls: int) -> dict:
    """The record of a compiled run: what the warm-up compiled and recorded, and what the timed calls did
    (a recompile there is a graph compiled after the warm-up)."""
    return {"graphs_compiled_warmup": warmup["graphs_compiled"], "recompiles_timed": timed["graphs_compiled"],
            "cuda_graph_replays_timed": timed["cuda_graph_replays"],
            "cuda_graph_replays_per_call": timed["cuda_graph_replays"] / timed_calls if timed_calls else None,
            "cuda_graph_skips": warmup["cuda_graph_skips"] + timed["cuda_graph_skips"],
            "cuda_graph_skip_reasons": list(dict.fromkeys(warmup["cuda_graph_skip_reasons"]
                                                          + timed["cuda_graph_skip_reasons"]))}
