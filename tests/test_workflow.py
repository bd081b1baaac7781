"""The workflow: config validation rejects bad input early; the smoke profile runs end to end."""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from barkbench import variants

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def default_config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_default_and_smoke_configs_are_valid(default_config):
    validate(copy.deepcopy(default_config), str(SCHEMA))
    smoke = {**default_config, **yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())}
    validate(smoke, str(SCHEMA))


def test_schema_knows_exactly_the_registry():
    pattern = yaml.safe_load(SCHEMA.read_text())["properties"]["variants"]["items"]["pattern"]
    names = set(re.search(r"\^\(([^)]*)\)", pattern).group(1).split("|"))
    assert names == set(variants.REGISTRY)


@pytest.mark.parametrize("path,value,message", [
    (("variants",), ["eager", "turbo"], "turbo"),
    (("batch_sizes",), [0], "0"),
    (("protocol", "cpu", "iterations"), 0, "0"),
    (("protocol", "cuda", "length_mode"), "whatever", "whatever"),
    (("device",), "tpu", "tpu"),
    (("models",), ["suno/bark-huge"], "bark-huge"),
    (("prompts",), [], "prompts"),
    (("colour",), "blue", "colour"),
])
def test_schema_rejects_bad_config(default_config, path, value, message):
    config = copy.deepcopy(default_config)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(WorkflowError) as err:
        validate(config, str(SCHEMA))
    assert message in str(err.value)


def _workflow_copy(tmp_path: Path) -> Path:
    for item in ("Snakefile", "workflow", "config", "report", "envs"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    return tmp_path


def _snakemake(cwd: Path, *args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("bad", ["variants: [eager, fp16+bf16]\n", "variants: [eager, sdpa\n",
                                 "batch_sizes: [1, -8]\n"])
def test_bad_config_stops_before_any_job(tmp_path, bad):
    work = _workflow_copy(tmp_path)
    (work / "bad.yaml").write_text(bad)
    out = _snakemake(work, "--cores", "1", "report", "--configfile", "bad.yaml")
    assert out.returncode != 0
    assert not (work / "results").exists()
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path, monkeypatch):
    """`snakemake --profile workflow/profiles/smoke report` renders one self-contained report."""
    monkeypatch.setenv("BARKBENCH_CACHE", os.environ.get("BARKBENCH_CACHE", str(tmp_path / "cache")))
    work = _workflow_copy(tmp_path)
    dry = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "report")
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = _snakemake(work, "--profile", "workflow/profiles/smoke", "report")
    assert out.returncode == 0, out.stderr[-3000:]
    html = (work / "results" / "report.html").read_text()
    assert "Change vs eager" in html and "Latency" in html
    for name in ("latency", "memory", "throughput", "pareto", "stages", "lengths"):
        assert (work / "results" / "figures" / f"{name}.png").exists()
    assert html.count("data:image/png;base64") >= 6
    runs = list((work / "results").glob("*/synthetic--tiny/*/bs*.json"))
    ok = [p for p in runs if '"status": "ok"' in p.read_text()]
    assert ok and len(re.findall(r"<audio[^>]*src=\"data:audio", html)) == len(ok)
    assert "not applicable on cpu" in html
    again = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "report")
    assert "Nothing to be done" in again.stdout + again.stderr
