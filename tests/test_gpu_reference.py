"""scripts/gpu-reference: the jobs it declares (the device-side loop only when registered), and its CPU dry run
end to end: every declared result file written, the noise floors, the config it ran."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from barkbench import layout, variants

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-reference"


@pytest.fixture(scope="module")
def reference():
    loader = importlib.machinery.SourceFileLoader("gpu_reference", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_reference", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_device_side_loop_runs_only_when_registered(reference, monkeypatch):
    config = reference.reference_config(dry_run=False)
    assert config["variants"][:4] == ["eager", "sdpa", "sdpa+fp16", "sdpa+static+compile"]
    assert not any("devloop" in v for v in config["variants"]) or "devloop" in variants.REGISTRY
    monkeypatch.setitem(variants.REGISTRY, "devloop", variants.Optimization(
        "devloop", "stand-in of the device-side decode loop", requires=("sdpa",)))
    config = reference.reference_config(dry_run=False)
    assert config["variants"][-1] == "sdpa+devloop" and config["batch_sizes"]["cuda"] == [1, 8]
    assert config["protocol"]["cuda"]["max_new_tokens"] == 256
    labels = [label for label, _ in reference.jobs(config, "cuda", "res", "gpu")]
    assert "run sdpa+devloop bs8 rep2" in labels and "fidelity sdpa+devloop" in labels and "fidelity eager" not in labels
    assert "run control bs8 rep2" in labels
    args = dict(reference.jobs(config, "cuda", "res", "gpu"))["run sdpa+devloop bs8 rep2"]
    assert args[args.index("--out") + 1] == layout.path("res", layout.RUN, hardware="gpu", model="suno--bark-small",
                                                        variant="sdpa+devloop", bs=8, k=2)
    assert args[args.index("--max-new-tokens") + 1] == "256"


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--results", str(tmp_path), "--hardware", "dry"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    config = yaml.safe_load((tmp_path / "dry" / "gpu-reference.yaml").read_text())
    assert config["models"] == ["synthetic:tiny"] and "sdpa+static+compile" not in config["variants"]
    where = {"hardware": "dry", "model": "synthetic--tiny"}
    reps = range(1, config["replicates"] + 1)
    declared = [layout.path(str(tmp_path), layout.RUN, variant=v, bs=bs, k=k, **where)
                for v in config["variants"] for bs in config["batch_sizes"]["cpu"] for k in reps]
    declared += [layout.path(str(tmp_path), layout.CONTROL, bs=bs, k=k, **where)
                 for bs in config["batch_sizes"]["cpu"] for k in reps]
    declared += [layout.path(str(tmp_path), layout.FIDELITY, variant=v, **where)
                 for v in config["variants"] if v != config["baseline"]]
    for path in declared:
        assert json.loads(Path(path).read_text())["status"] in ("ok", "not_applicable"), path
    floors = [json.loads(line) for line in Path(layout.path(str(tmp_path), layout.NOISE_FLOOR, **where)).read_text()
              .splitlines()]
    assert [f["variant"] for f in floors] == ["sdpa", "bf16"] and {f["device"] for f in floors} == {"cpu"}
    status = json.loads((tmp_path / "logs" / "dry" / "gpu-reference.json").read_text())
    assert status["cuda_tests"]["returncode"] in (0, 5) and "skipped" in status["cuda_tests"]["summary"]
    assert "results_from=[\"dry\"]" in out.stderr
