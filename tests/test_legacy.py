"""The 2023 stack: its environment (built once per pins), a run on it, the `legacy`/`bt` registry entries,
the padded-batch check that tells a mask-ignoring attention from a correct one, and the "2023 stack vs
today" table."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from barkbench import attention, cache, fidelity, legacy, models, tables, variants
from barkbench.study2023 import PUBLISHED_TO_OURS
from barkbench.records import FidelityResult, RunResult
from conftest import TINY, MaskIgnoredInBatches, make_run_json, swap_attention

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "envs" / "legacy-requirements.txt"
CPU = torch.device("cpu")
# The environments' root: the user's barkbench cache (read at collection, before the session fixture
# points BARKBENCH_CACHE at a temporary folder), so the environment is built once and reused across runs.
ENV_ROOT = cache.cache_dir()
# one xdist worker builds the environment and runs every test that uses it (`pytest -n auto --dist loadgroup`)
pytestmark = pytest.mark.xdist_group("legacy")


def test_pins_hash_follows_the_pins_not_the_comments(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("# the stack\ntransformers==4.45.2\noptimum==1.23.3\n")
    b.write_text("transformers==4.45.2  # pinned\n\noptimum==1.23.3\n")
    c.write_text("transformers==4.46.0\noptimum==1.23.3\n")
    assert legacy.pins(a) == legacy.pins(b) == ["transformers==4.45.2", "optimum==1.23.3"]
    assert legacy.pins_hash(a) == legacy.pins_hash(b) != legacy.pins_hash(c)
    assert legacy.env_dir(a, tmp_path).parent == tmp_path / "envs"


def test_the_legacy_pins_name_the_study_stack():
    pins = dict(line.split("==") for line in legacy.pins(REQUIREMENTS))
    assert pins["transformers"].startswith("4.") and pins["optimum"] == "1.23.3"
    main = dict(line.split("==") for line in legacy.pins(REPO / "envs" / "requirements.txt"))
    assert pins["torch"] == main["torch"]  # same kernels on both stacks


def test_legacy_variants_are_not_applicable_on_todays_stack():
    assert not legacy.is_legacy_stack()
    reason = variants.parse("legacy+bt").not_applicable_reason(CPU)
    assert reason.startswith("not applicable here: legacy runs on the 2023 stack")
    assert variants.parse("legacy+eager").not_applicable_reason(CPU) == reason
    with pytest.raises(variants.VariantError, match="both set the attention"):
        variants.parse("legacy+bt+sdpa")
    assert legacy.baseline_for("legacy+bt", "eager") == "legacy+eager"
    assert legacy.baseline_for("sdpa", "eager") == "eager"
    # today's counterpart of a 2023 variant (the stacks table pairs legacy+bt+fp16 with sdpa+fp16): each 2023
    # optimization and its successor are registered optimizations
    assert legacy.today_counterpart(frozenset(variants.parse("legacy+bt+fp16").names)) == {"sdpa", "fp16"}
    assert set(legacy.SUCCESSOR.values()) <= set(variants.REGISTRY) >= set(legacy.SUCCESSOR)


def test_load_dtype_is_spelled_for_the_stack(monkeypatch):
    kwargs = {"dtype": torch.float16, "device_map": None}
    assert legacy.from_pretrained_kwargs(kwargs) == kwargs
    monkeypatch.setattr(legacy, "transformers_major", lambda: 4)
    assert legacy.from_pretrained_kwargs(kwargs) == {"torch_dtype": torch.float16, "device_map": None}


# --- the padded-batch check ----------------------------------------------------------------------

def _padded(tiny_checkpoint, swap):
    loaded = models.load(models.resolve(TINY))
    candidate = models.load(models.resolve(TINY)).model
    swap_attention(candidate, swap)
    return fidelity.padded_batch(loaded.model, candidate, loaded.processor, CPU)


def test_padded_batch_tells_a_mask_ignoring_attention_from_a_correct_one(tiny_checkpoint):
    correct = _padded(tiny_checkpoint, attention.BarkSdpaAttention)
    wrong = _padded(tiny_checkpoint, MaskIgnoredInBatches)
    for report in (correct, wrong):
        assert report["batch_size"] == fidelity.PADDED_BATCH and report["padded_rows"] >= 1
    tol = variants.FLOAT_ROUNDING
    assert correct["max_rel"] <= tol.logits_max_rel and correct["kl_mean"] <= tol.kl_mean
    assert wrong["max_rel"] > tol.logits_max_rel and wrong["kl_mean"] > tol.kl_mean
    empty = {"teacher_forced": {}, "free_running": {}, "codec": {"snr_db": None}, "batched": {"rows": []},
             "chain": {"fine_decisions": {"same_context_max_abs": 0.0, "same_context_max_rel": 0.0,
                                          "decisive_mismatches": 0}}}
    assert fidelity.check(tol, {**empty, "padded_batch": correct}) == []
    violations = fidelity.check(tol, {**empty, "padded_batch": wrong})
    assert violations and all(v.startswith("padded batch") for v in violations)


# --- the environment and a run on it (builds once per pins hash; pip downloads the first time) -------

@pytest.fixture(scope="module")
def legacy_python():
    described = legacy.build_env(REQUIREMENTS, ENV_ROOT)
    assert "optimum==1.23.3" in described["installed"] and "transformers==4.45.2" in described["installed"]
    return described["python"]


def _legacy_cli(python, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([python, "-m", "barkbench", *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_tiny_legacy_run_writes_a_valid_record(legacy_python, tiny_checkpoint, tmp_path):
    out = tmp_path / "legacy+bt" / "bs2.json"
    done = _legacy_cli(legacy_python, "run", "--model", TINY, "--variant", "legacy+bt", "--device", "cpu",
                       "--batch-size", "2", "--warmup", "1", "--min-iterations", "1", "--max-iterations", "1",
                       "--max-new-tokens", "8", "--greedy", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rec = RunResult.from_json(out)  # validated against today's schema
    assert rec.status == "ok", rec.reason
    assert rec.versions["transformers"] == "4.45.2" and rec.versions["optimum"] == "1.23.3"
    assert rec.variant["optimizations"] == ["legacy", "bt"]
    assert any("BetterTransformer" in note for note in rec.variant["notes"])


@pytest.mark.slow
def test_bt_fails_the_padded_batch_that_eager_passes(legacy_python, tiny_checkpoint, tmp_path):
    out = tmp_path / "fidelity" / "legacy+bt.json"
    done = _legacy_cli(legacy_python, "fidelity", "--model", TINY, "--variant", "legacy+bt", "--baseline",
                       "legacy+eager", "--device", "cpu", "--tokens", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rec = FidelityResult.from_json(out)
    assert rec.status == "ok", rec.reason
    assert rec.versions["transformers"] == "4.45.2"
    assert rec.padded_batch["kl_mean"] > variants.FLOAT_ROUNDING.kl_mean and rec.within_tolerance is False
    assert any(v.startswith("padded batch") for v in rec.violations)


# --- the "2023 stack vs today" table ---------------------------------------------------------------

OLD = {"python": "3.11.0", "torch": "2.13.0", "transformers": "4.45.2", "accelerate": "1.0.1", "optimum": "1.23.3"}
NEW = {"python": "3.11.0", "torch": "2.13.0", "transformers": "5.24.0", "accelerate": "1.15.0"}


def test_stacks_table_pairs_each_study_row_with_its_successor(tmp_path):
    slow, fast = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3], [5.0, 5.1, 4.9, 5.05, 5.0, 5.2]
    runs = [make_run_json(tmp_path, "legacy+eager", 1, slow, versions=OLD),
            make_run_json(tmp_path, "legacy+bt", 1, [x * 0.8 for x in slow], versions=OLD),
            make_run_json(tmp_path, "eager", 1, fast, versions=NEW),
            make_run_json(tmp_path, "sdpa", 1, [x * 0.9 for x in fast], versions=NEW)]
    df = tables.cells_table(tables.runs_table([(p.parts[-4], p, RunResult.from_json(p)) for p in runs], "eager"),
                            "eager")
    reference = pd.DataFrame({"source": ["blog-2023"] * 2, "batch_size": [1, 1], "latency_s": [10.0, 7.5],
                              "variant": ["no optimization", "bettertransformer"]})
    st = tables.stacks_table(df, "eager", PUBLISHED_TO_OURS, reference).set_index("variant_2023")
    assert list(st.index) == ["legacy+eager", "legacy+bt", "legacy+bt"]
    eager = st.loc["legacy+eager"]
    assert eager["variant_today"] == "eager" and eager["latency_change_pct"] < -40
    assert eager["differs"].startswith("versions only") and "transformers=4.45.2" in eager["differs"]
    pairs = st.loc[["legacy+bt"]]
    successor, fastest = pairs.iloc[0], pairs.iloc[1]
    assert successor["variant_today"] == "sdpa" and fastest["comparison"] == "fastest of each stack"
    assert fastest["variant_today"] == "sdpa"
    assert successor["speedup_2023"] > 1.2 and successor["speedup_today"] > 1.05
    assert successor["published_pct"] == pytest.approx(-25.0)


def test_legacy_env_refuses_a_missing_requirements_file(tmp_path, capsys):
    from barkbench.cli import main

    assert main(["legacy-env", "--requirements", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "env.json"),
                 "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("barkbench: error: no requirements file") and err.count("\n") == 1
    assert not (tmp_path / "envs").exists()
