"""Where Bark weights come from: hub checkpoints or offline synthetic ones with the same architecture.

Synthetic checkpoints are built once with random weights from a fixed seed, written with
`save_pretrained` to a cache folder and loaded back through the very same `from_pretrained` path
as a hub checkpoint, so a benchmark exercises identical code either way.
"""
from __future__ import annotations

import ctypes
import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import build_dir, cache_dir
from .legacy import from_pretrained_kwargs as spelled_for_this_stack

HUB_MODELS = {"suno/bark-small": "bark-small", "suno/bark": "bark"}
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SEED = 1234


@dataclass(frozen=True)
class Architecture:
    """Per sub-model shape of a Bark checkpoint (semantic, coarse and fine share layers/heads/hidden)."""

    num_layers: int
    num_heads: int
    hidden_size: int
    codec_filters: int = 32  # EnCodec 24 kHz
    codec_hidden: int = 128
    codec_lstm_layers: int = 2
    description: str = ""


ARCHITECTURES = {
    "bark-small": Architecture(12, 12, 768, description="suno/bark-small: 12 layers x 12 heads x 768"),
    "bark": Architecture(24, 16, 1024, description="suno/bark: 24 layers x 16 heads x 1024"),
    # Same structure and vocabularies, a few layers and a small width: one generation well under a second.
    "tiny": Architecture(2, 2, 32, codec_filters=4, codec_hidden=16, codec_lstm_layers=1,
                         description="test model: 2 layers x 2 heads x 32, small EnCodec"),
}

# Vocabularies and special tokens of the real checkpoints (shared by every architecture).
SEMANTIC_VOCAB = {"input_vocab_size": 129_600, "output_vocab_size": 10_048}
COARSE_VOCAB = {"input_vocab_size": 12_096, "output_vocab_size": 12_096}
FINE_VOCAB = {"input_vocab_size": 1_056, "output_vocab_size": 1_056, "n_codes_total": 8, "n_codes_given": 1}
SEMANTIC_GENERATION = {
    "eos_token_id": 10_000, "renormalize_logits": True, "max_new_tokens": 768, "temperature": 1.0,
    "do_sample": False, "text_encoding_offset": 10_048, "text_pad_token": 129_595,
    "semantic_infer_token": 129_599, "semantic_vocab_size": 10_000, "max_input_semantic_length": 256,
    "semantic_rate_hz": 49.9,
}
COARSE_GENERATION = {
    "renormalize_logits": True, "temperature": 1.0, "do_sample": False, "coarse_semantic_pad_token": 12_048,
    "coarse_rate_hz": 75, "n_coarse_codebooks": 2, "coarse_infer_token": 12_050,
    "max_coarse_input_length": 256, "max_coarse_history": 630, "sliding_window_len": 60,
}
FINE_GENERATION = {"temperature": 1.0, "max_fine_history_length": 512, "max_fine_input_length": 1024,
                   "n_fine_codebooks": 8}


class ModelSourceError(RuntimeError):
    """A model id that cannot be resolved (unknown, or a hub id neither reachable nor cached)."""


@dataclass
class ModelSource:
    requested: str
    id: str  # what actually ran: a hub id, a local path or synthetic:<arch>
    weights: str  # "hub" | "synthetic"
    architecture: str
    path: str  # what from_pretrained receives


@dataclass
class LoadedModel:
    model: object
    processor: object
    source: ModelSource


def known_models() -> list[str]:
    return sorted(HUB_MODELS) + [SYNTHETIC_PREFIX + a for a in ARCHITECTURES]


def synthetic_config(arch_name: str):
    from transformers import BarkConfig, EncodecConfig

    arch = ARCHITECTURES[arch_name]
    common = {"num_layers": arch.num_layers, "num_heads": arch.num_heads, "hidden_size": arch.hidden_size,
              "block_size": 1024, "bias": False, "dropout": 0.0}
    codec = EncodecConfig(
        sampling_rate=24_000, num_filters=arch.codec_filters, hidden_size=arch.codec_hidden,
        num_lstm_layers=arch.codec_lstm_layers, codebook_size=1024,
        target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0], upsampling_ratios=[8, 5, 4, 2],
    )
    return BarkConfig(
        semantic_config={**common, **SEMANTIC_VOCAB},
        coarse_acoustics_config={**common, **COARSE_VOCAB},
        fine_acoustics_config={**common, **FINE_VOCAB},
        codec_config=codec.to_dict(),
    )


def synthetic_tokenizer():
    """A local WordPiece tokenizer (characters and frequent English words) wrapped as a BERT tokenizer,
    the tokenizer class of the real checkpoints; ids stay far below Bark's text vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    words = ("the a an and of to in is it that with for on as was be this are have you i we they "
             "speech bark model text generating let's try wow batching great love hugging face cool "
             "so hello world voice sound audio").split()
    vocab = specials + chars + ["##" + c for c in chars] + [w for w in words if w not in chars]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


def build_synthetic(arch_name: str, root: Path | None = None) -> Path:
    """Build (once) and return the folder of a synthetic checkpoint; written atomically."""
    from transformers import BarkModel, BarkProcessor
    from transformers import GenerationConfig

    if arch_name not in ARCHITECTURES:
        raise ModelSourceError(f"unknown synthetic architecture {arch_name!r}; known: {', '.join(ARCHITECTURES)}")
    target = Path(root or cache_dir()) / f"synthetic-{arch_name}-seed{SYNTHETIC_SEED}"

    def build(staged: Path) -> None:
        torch.manual_seed(SYNTHETIC_SEED)
        model = BarkModel(synthetic_config(arch_name))
        # As in the hub's generation_config.json: a plain GenerationConfig carrying the sub-configs,
        # which BarkModel.generate turns into Bark{Semantic,Coarse,Fine}GenerationConfig.
        model.generation_config = GenerationConfig(
            semantic_config=SEMANTIC_GENERATION, coarse_acoustics_config=COARSE_GENERATION,
            fine_acoustics_config=FINE_GENERATION, sample_rate=24_000, codebook_size=1024,
        )
        model.save_pretrained(staged)
        BarkProcessor(tokenizer=synthetic_tokenizer()).save_pretrained(staged)

    build_dir(target, build, complete="config.json")
    return target


def hub_answers(model_id: str, timeout_s: float = 5.0) -> bool:
    """True if the hub answers about `model_id` within `timeout_s`. Asked from a daemon thread: a hanging DNS
    lookup is bounded by no HTTP timeout, and would otherwise hold every job for as long as it hangs."""
    import threading

    answer: list[bool] = []

    def ask():
        from huggingface_hub import model_info

        try:
            model_info(model_id, timeout=timeout_s)
            answer.append(True)
        except Exception:
            answer.append(False)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answer and answer[0])


def hub_cached(model_id: str) -> bool:
    """True if the checkpoint is in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(model_id, local_files_only=True, allow_patterns=["config.json"])
        return True
    except Exception:
        return False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hub_available(model_id: str) -> bool:
    """True if the checkpoint is cached locally or the hub answers."""
    return hub_cached(model_id) or (not hub_offline() and hub_answers(model_id, timeout_s=10))


def resolve(model_id: str, offline_fallback: str | None = None) -> ModelSource:
    if model_id.startswith(SYNTHETIC_PREFIX):
        arch = model_id[len(SYNTHETIC_PREFIX):]
        if arch not in ARCHITECTURES:
            raise ModelSourceError(f"unknown model {model_id!r}; known: {', '.join(known_models())}")
        return ModelSource(model_id, model_id, "synthetic", arch, "")
    if model_id in HUB_MODELS:
        arch = HUB_MODELS[model_id]
        if _hub_available(model_id):
            return ModelSource(model_id, model_id, "hub", arch, model_id)
        equivalent = SYNTHETIC_PREFIX + arch
        if offline_fallback == "synthetic":
            return ModelSource(model_id, equivalent, "synthetic", arch, "")
        raise ModelSourceError(
            f"{model_id} is neither reachable nor cached; use --model {equivalent} "
            f"(or --offline-fallback synthetic)")
    if os.path.isdir(model_id):
        return ModelSource(model_id, model_id, "hub", "local", model_id)
    raise ModelSourceError(f"unknown model {model_id!r}; known: {', '.join(known_models())}")


def load(source: ModelSource, **from_pretrained_kwargs) -> LoadedModel:
    """Load model and processor through `from_pretrained`, whatever the source."""
    from transformers import AutoProcessor, BarkModel

    path = source.path or str(build_synthetic(source.architecture))
    model = BarkModel.from_pretrained(path, **spelled_for_this_stack(from_pretrained_kwargs))
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    return LoadedModel(model, processor, source)


def materialize(model: torch.nn.Module) -> None:
    """Copy parameters and buffers into process memory. `from_pretrained` leaves fp32 CPU weights as views
    of the memory-mapped checkpoint, resident only once touched and counted as file pages, while a
    converted dtype lives in anonymous memory: without this, CPU memory of variants is not comparable."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    release_memory()


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS means live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def tensor_bytes(tensor) -> int:
    """Bytes a tensor holds. A tensor subclass (torchao's quantized weights) reports the numel and dtype of the
    tensor it stands for; what it holds are its inner tensors (int8 data, scales, zero points)."""
    if hasattr(type(tensor), "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    if tensor.is_meta:  # a module whose weights another runtime holds (barkbench.ort_int8): counted there
        return 0
    return tensor.numel() * tensor.element_size()


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized packed weights included via state_dict), each tensor once (Bark's
    fine heads are tied to its embeddings: 23 MB of bark-small's, counted twice by a plain sum), and the weights
    another runtime holds for a sub-model it runs (`runtime_weight_bytes`, barkbench.ort_int8, barkbench.ort_runtime)."""
    total = sum(int(getattr(module, "runtime_weight_bytes", 0)) for module in model.modules())
    held = {id(value): value for value in model.state_dict(keep_vars=True).values() if isinstance(value, torch.Tensor)}
    for value in held.values():
        total += tensor_bytes(value)
    for module in model.modules():  # torch.ao dynamic quantized Linear keeps its int8 weight packed
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)
    return total


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
