"""The fine stage on the real frames instead of a 1024-frame window (`finewin`, an approximate optimization).

`BarkFineModel.generate` pads its input to `max_fine_input_length` (1024) frames whatever the length and runs
one full forward pass per predicted codebook (six) over the window, then samples all of its positions. A
call of 32 semantic tokens makes ~48 frames: ~95 % of the fine model's work is padding. Here the window is
the frames rounded up to a multiple of `WINDOW_MULTIPLE` (a kernel-friendly length), at most the original.

What it changes: the fine model is non-causal (every position attends to every other, padding included,
with no attention mask), so the real frames' logits change: they no longer see the ~1000 padded positions
nor the codes sampled there. The fine model's weights and arithmetic are untouched; only the window length
differs. It is therefore lossy: the fidelity check's chain (fine codes from the same coarse tokens, waveform
SNR) reports its cost; its teacher-forced check (fixed 1024-frame random inputs) does not see it.

There is no exact counterpart worth having: padded positions' sampled codes feed the next codebook's pass,
so every pass but the last needs them; in the last pass only the real positions of the last layer and
the lm head could be skipped (~1/72 of the fine model's FLOPs at 48 frames).
"""
from __future__ import annotations

import copy

from transformers.models.bark.modeling_bark import BarkFineModel

WINDOW_MULTIPLE = 64


def window_frames(frames: int, max_window: int, multiple: int | None = WINDOW_MULTIPLE) -> int:
    """Frames of one fine-model pass for an input of `frames` frames: generate's window `max_window`, or
    with `multiple`, the frames rounded up to it (never more than `max_window`; longer inputs keep
    generate's sliding 1024-frame windows)."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1 (got {frames})")
    if multiple is None or frames >= max_window:
        return max_window
    return min(max_window, -(-frames // multiple) * multiple)


class WindowedBarkFineModel(BarkFineModel):
    """A Bark fine model whose generate pads to the rounded-up real frames rather than to the full window."""

    window_multiple: int = WINDOW_MULTIPLE

    def generate(self, coarse_output, semantic_generation_config=None, coarse_generation_config=None,
                 fine_generation_config=None, codebook_size: int = 1024, history_prompt=None, **kwargs):
        if fine_generation_config is not None and coarse_generation_config is not None and history_prompt is None:
            frames = coarse_output.shape[-1] // coarse_generation_config.n_coarse_codebooks
            window = window_frames(frames, fine_generation_config.max_fine_input_length, self.window_multiple)
            if window < fine_generation_config.max_fine_input_length:
                # One window covers every frame: generate then runs exactly one outer loop, filling from frame 0
                # when the history length is at most the window (its fill start is min(0, window - history)).
                fine_generation_config = copy.deepcopy(fine_generation_config)
                fine_generation_config.max_fine_input_length = window
                fine_generation_config.max_fine_history_length = min(
                    fine_generation_config.max_fine_history_length, window)
        return super().generate(coarse_output, semantic_generation_config, coarse_generation_config,
                                fine_generation_config, codebook_size, history_prompt, **kwargs)


def use_fine_window(model) -> None:
    """Swap the fine sub-model's class in place (as `attention.use_sdpa` does): generate pads to the real
    frames rounded up to `WINDOW_MULTIPLE`. The swap survives stage timers and a compiled forward (both
    patch the instance)."""
    fine = model.fine_acoustics
    if type(fine) is not BarkFineModel:
        raise RuntimeError(f"expected a plain BarkFineModel, got {type(fine).__name__}")
    fine.__class__ = WindowedBarkFineModel
