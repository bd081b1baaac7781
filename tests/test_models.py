"""Model sources: synthetic checkpoints written with save_pretrained and read back with from_pretrained,
the real checkpoints' vocabularies and generation config, and hub-id resolution when offline."""
from __future__ import annotations

import json

import pytest
import torch

from barkbench import layout, models
from conftest import TINY

CHECKPOINT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json")


def test_build_writes_a_checkpoint_folder(tiny_checkpoint, barkbench_cache):
    for name in CHECKPOINT_FILES:
        assert (tiny_checkpoint / name).is_file(), name
        assert (tiny_checkpoint / name).stat().st_size > 0, name
    assert tiny_checkpoint.name == f"synthetic-tiny-seed{models.SYNTHETIC_SEED}"
    # built atomically: the staging folder is gone, only the checkpoint is left in the cache
    assert [p.name for p in barkbench_cache.iterdir() if p.name.startswith(".")] == []


def test_build_is_done_once(tiny_checkpoint):
    before = (tiny_checkpoint / "model.safetensors").stat().st_mtime_ns
    assert models.build_synthetic("tiny") == tiny_checkpoint
    assert (tiny_checkpoint / "model.safetensors").stat().st_mtime_ns == before


def test_build_unknown_architecture_refused(tmp_path):
    with pytest.raises(models.ModelSourceError, match="huge"):
        models.build_synthetic("huge", root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_from_pretrained_round_trip_matches_a_fresh_build(tiny_checkpoint):
    from transformers import BarkModel

    loaded = models.load(models.resolve(TINY))
    assert loaded.source.weights == "synthetic"
    torch.manual_seed(models.SYNTHETIC_SEED)
    fresh = BarkModel(models.synthetic_config("tiny"))
    got, want = loaded.model.state_dict(), fresh.state_dict()
    assert sorted(got) == sorted(want)
    assert len(got) > 50
    mismatched = [k for k in want if not torch.equal(got[k], want[k])]
    assert mismatched == []
    # a different seed gives different weights: the comparison above can tell
    torch.manual_seed(models.SYNTHETIC_SEED + 1)
    other = BarkModel(models.synthetic_config("tiny")).state_dict()
    assert not torch.equal(other["semantic.lm_head.weight"], got["semantic.lm_head.weight"])
    assert models.parameter_count(loaded.model) == sum(p.numel() for p in fresh.parameters())
    assert models.weights_bytes(loaded.model) >= 4 * models.parameter_count(loaded.model)


def test_config_has_the_real_vocabularies(tiny_checkpoint):
    from transformers import BarkConfig

    config = BarkConfig.from_pretrained(tiny_checkpoint)
    sem, coarse, fine = config.semantic_config, config.coarse_acoustics_config, config.fine_acoustics_config
    assert (sem.input_vocab_size, sem.output_vocab_size) == (129_600, 10_048)
    assert (coarse.input_vocab_size, coarse.output_vocab_size) == (12_096, 12_096)
    assert (fine.input_vocab_size, fine.output_vocab_size) == (1_056, 1_056)
    assert (fine.n_codes_total, fine.n_codes_given) == (8, 1)
    for sub in (sem, coarse, fine):
        assert sub.block_size == 1024
        assert (sub.num_layers, sub.num_heads, sub.hidden_size) == (2, 2, 32)
    assert config.codec_config.sampling_rate == 24_000


def test_generation_config_carries_the_sub_configs(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    for key in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config"):
        assert isinstance(raw[key], dict) and raw[key], key
    assert raw["semantic_config"]["text_pad_token"] == 129_595
    assert raw["semantic_config"]["semantic_infer_token"] == 129_599
    assert raw["coarse_acoustics_config"]["n_coarse_codebooks"] == 2
    assert raw["fine_acoustics_config"]["n_fine_codebooks"] == 8
    assert raw["sample_rate"] == 24_000 and raw["codebook_size"] == 1024
    # and the loaded model sees the same
    gc = models.load(models.resolve(TINY)).model.generation_config
    assert gc.semantic_config["text_pad_token"] == 129_595
    assert gc.semantic_config["semantic_infer_token"] == 129_599
    assert gc.coarse_acoustics_config["coarse_infer_token"] == 12_050


def test_processor_tokenizes_a_prompt_to_256_ids(tiny_checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(["Let's try generating speech, with Bark, a text-to-speech model", "Wow!"],
                       return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == (2, 256) and mask.shape == (2, 256)
    assert 0 < int(mask[1].sum()) < int(mask[0].sum()) < 256
    # shifted by Bark's text offset, every id stays below the text pad token
    assert int(ids.max()) + models.SEMANTIC_GENERATION["text_encoding_offset"] < 129_595
    unk = processor.tokenizer.unk_token_id
    assert int((ids[0][mask[0].bool()] == unk).sum()) == 0


@pytest.mark.parametrize("arch,shape", [("bark-small", (12, 12, 768)), ("bark", (24, 16, 1024))])
def test_real_architectures(arch, shape, barkbench_cache):
    a = models.ARCHITECTURES[arch]
    assert (a.num_layers, a.num_heads, a.hidden_size) == shape
    before = set(barkbench_cache.glob(f"synthetic-{arch}-*"))  # other tests of the session may have built it
    config = models.synthetic_config(arch)  # a config only: no weights are built
    for sub in (config.semantic_config, config.coarse_acoustics_config, config.fine_acoustics_config):
        assert (sub.num_layers, sub.num_heads, sub.hidden_size) == shape
        assert sub.block_size == 1024
    assert config.semantic_config.input_vocab_size == 129_600
    assert config.fine_acoustics_config.n_codes_total == 8
    assert set(barkbench_cache.glob(f"synthetic-{arch}-*")) == before


def test_known_models_and_slug():
    known = models.known_models()
    assert {"suno/bark-small", "suno/bark", "synthetic:bark-small", "synthetic:bark", TINY} <= set(known)
    assert layout.slug("suno/bark-small") == "suno--bark-small"
    assert layout.slug(TINY) == "synthetic--tiny"


def test_resolve_synthetic_and_unknown():
    src = models.resolve(TINY)
    assert (src.requested, src.id, src.weights, src.architecture) == (TINY, TINY, "synthetic", "tiny")
    with pytest.raises(models.ModelSourceError, match="synthetic:nope"):
        models.resolve("synthetic:nope")
    with pytest.raises(models.ModelSourceError, match="suno/bark-huge"):
        models.resolve("suno/bark-huge")


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face cache (even on a machine that has Bark cached)."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return home


def test_resolve_hub_id_offline_without_cache_names_the_synthetic_equivalent(empty_hf_cache):
    with pytest.raises(models.ModelSourceError) as err:
        models.resolve("suno/bark-small")
    assert "synthetic:bark-small" in str(err.value)
    assert "offline-fallback" in str(err.value)


def test_resolve_hub_id_offline_fallback_to_synthetic(empty_hf_cache):
    src = models.resolve("suno/bark-small", offline_fallback="synthetic")
    assert src.requested == "suno/bark-small"
    assert src.id == "synthetic:bark-small"
    assert src.weights == "synthetic"
    assert src.architecture == "bark-small"
    assert src.path == ""  # load() builds the synthetic checkpoint
    big = models.resolve("suno/bark", offline_fallback="synthetic")
    assert (big.id, big.architecture) == ("synthetic:bark", "bark")


def test_a_hanging_hub_is_given_up_after_the_timeout(monkeypatch):
    """A DNS lookup that hangs is bounded by no HTTP timeout: the question is abandoned, not waited for."""
    import threading

    import huggingface_hub

    release = threading.Event()
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: release.wait(120))
    try:
        assert models.hub_answers("suno/bark-small", timeout_s=0.5) is False
    finally:
        release.set()
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: None)
    assert models.hub_answers("suno/bark-small", timeout_s=5) is True


def test_a_quantized_tensor_subclass_counts_what_it_holds():
    """torchao's quantized weights are tensor subclasses reporting the shape and dtype they stand for."""

    class Int8Weight:  # the subclass protocol weights_bytes relies on
        def __init__(self):
            self.qdata = torch.zeros(64, 32, dtype=torch.int8)
            self.scale = torch.zeros(64, 1, dtype=torch.float32)
            self.zero_point = None

        def __tensor_flatten__(self):
            return ["qdata", "scale", "zero_point"], None

    assert models.tensor_bytes(Int8Weight()) == 64 * 32 + 64 * 4
    assert models.tensor_bytes(torch.zeros(64, 32, dtype=torch.bfloat16)) == 64 * 32 * 2


def test_torchao_int8_weights_count_as_int8():
    torchao = pytest.importorskip("torchao.quantization")
    linear = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    before = models.weights_bytes(linear)
    torchao.quantize_(linear, torchao.Int8WeightOnlyConfig())
    assert models.weights_bytes(linear) < 0.6 * before


def test_tied_weights_count_once():
    """A tensor two modules share (Bark's fine heads and embeddings) is held once, and counted once."""
    untied = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False))
    tied = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False))
    tied[1].weight = tied[0].weight
    assert models.weights_bytes(tied) == models.weights_bytes(untied) // 2
