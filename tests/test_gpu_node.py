"""What a bare GPU node needs, checked on any machine: `pytest -m cuda` collects without snakemake and
jsonschema and reports skips; availability by import and one operation; compile needs a toolchain; a skip
of an expected optimization fails; energy and torch.compile counters are recorded (stand-in counters)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from barkbench import availability, compile_counters, energy, fragments, models, runner, tables, variants
from conftest import EXPECT_ENV, TINY, TORCH_THREADS, make_run_json, skip_not_applicable
from barkbench.protocol import Protocol

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent("""
    # A node without these packages: importing them fails as if they were not installed.
    import sys
    BLOCKED = {"snakemake", "jsonschema"}
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Blocker())
""")


@pytest.fixture
def node_env(tmp_path):
    """The environment of a Python process for which snakemake and jsonschema are not installed."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])}
    env.pop(EXPECT_ENV, None)
    return env


def test_cuda_tests_collect_and_skip_without_snakemake_or_jsonschema(node_env):
    blocked = subprocess.run([sys.executable, "-c", "import snakemake"], env=node_env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "No module named 'snakemake'" in blocked.stderr
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests"], cwd=ROOT, env=node_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert "error" not in summary and "passed" not in summary and "skipped" in summary, summary
    assert "the workflow tests need snakemake (not installed)" in out.stdout
    if torch.cuda.is_available():
        assert "needs a CUDA device" not in out.stdout
    else:
        assert "needs a CUDA device" in out.stdout


def test_validation_without_jsonschema_names_what_to_install(node_env):
    code = "from barkbench import results; from barkbench.records import RunResult; RunResult.from_dict({'schema_version': results.SCHEMA_VERSION})"
    out = subprocess.run([sys.executable, "-c", code], env=node_env, capture_output=True, text=True)
    assert out.returncode != 0 and "the package 'jsonschema'" in out.stderr and "gpu-wheelhouse" in out.stderr


# ---------------------------------------------------------------- availability

@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Importable test packages: one that works, one whose import raises (find_spec finds it)."""
    (tmp_path / "bb_fine").mkdir()
    (tmp_path / "bb_fine" / "__init__.py").write_text("")
    (tmp_path / "bb_broken").mkdir()
    (tmp_path / "bb_broken" / "__init__.py").write_text("raise OSError('undefined symbol: _ZN3c10')")
    monkeypatch.syspath_prepend(str(tmp_path))
    availability.package_problem.cache_clear()
    yield
    availability.package_problem.cache_clear()


def test_a_package_is_available_when_it_imports_and_passes_its_operation(packages, monkeypatch):
    cpu = torch.device("cpu")
    assert availability.package_problem("bb_fine", cpu) is None
    assert availability.package_problem("bb_missing", cpu) == "not installed"
    assert availability.package_problem("bb_broken", cpu).startswith("installed but does not import (OSError")

    def failing(device):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(availability.SMOKE, "bb_fine", failing)
    availability.package_problem.cache_clear()
    problem = availability.package_problem("bb_fine", cpu)
    assert problem.startswith("installed but fails a one-operation test on cpu (RuntimeError: no kernel image")
    opt = variants.Optimization("bbtest", "test", needs_packages=("bb_broken",))
    assert opt.not_applicable_reason(cpu).startswith("not applicable here: bbtest needs the package 'bb_broken', "
                                                     "installed but does not import")


# ---------------------------------------------------------------- compile toolchain

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_without_a_toolchain_is_not_applicable(device, tmp_path, monkeypatch):
    include = tmp_path / "include"
    include.mkdir()
    monkeypatch.setattr(availability.sysconfig, "get_paths", lambda: {"include": str(include)})
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(availability.shutil, "which", lambda name: None)
    compile_opt = variants.REGISTRY["compile"]
    reason = compile_opt.not_applicable_reason(torch.device(device))
    assert reason.startswith(f"not applicable here: compile: {availability.TOOLCHAIN_REASON} (no C")
    assert "Python.h" in reason and "\n" not in reason
    (include / "Python.h").write_text("")
    compiler = "gcc" if device == "cuda" else "g++"
    monkeypatch.setattr(availability.shutil, "which", lambda name: f"/bin/{name}" if name == compiler else None)
    assert compile_opt.not_applicable_reason(torch.device(device)) is None
    monkeypatch.setattr(availability.shutil, "which", lambda name: f"/bin/{name}" if name == "mycc" else None)
    monkeypatch.setenv("CC" if device == "cuda" else "CXX", "mycc")
    assert compile_opt.not_applicable_reason(torch.device(device)) is None


def test_compile_without_a_toolchain_is_recorded_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(availability.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load", no_load)
    proto = Protocol(warmup=1, min_iterations=1, max_iterations=1, max_new_tokens=8)
    result = runner.run(runner.RunRequest(TINY, "sdpa+compile", proto, device="cpu", threads=TORCH_THREADS),
                        tmp_path / "bs1.json")
    assert result.status == "not_applicable"
    assert result.reason.startswith(f"not applicable here: compile: {availability.TOOLCHAIN_REASON}")
    assert json.loads((tmp_path / "bs1.json").read_text())["reason"] == result.reason


# ---------------------------------------------------------------- a skip of an expected optimization fails

def test_not_applicable_is_a_skip_unless_expected(monkeypatch):
    monkeypatch.delenv(EXPECT_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs the package"):
        skip_not_applicable("sdpa+nf4", "needs the package 'bitsandbytes'")
    monkeypatch.setenv(EXPECT_ENV, "fa2, nf4")
    with pytest.raises(pytest.fail.Exception, match=f"sdpa\\+nf4 is not applicable here, but {EXPECT_ENV} expects nf4"):
        skip_not_applicable("sdpa+nf4", "needs the package 'bitsandbytes'")
    with pytest.raises(pytest.skip.Exception):
        skip_not_applicable("sdpa+int8", "no CUDA kernel")  # not expected: still a skip
    monkeypatch.setenv(EXPECT_ENV, "fa3")
    with pytest.raises(pytest.fail.Exception, match="unknown optimization fa3"):
        skip_not_applicable("sdpa+nf4", "needs the package 'bitsandbytes'")


# ---------------------------------------------------------------- torch.compile counters

def test_compile_counters_count_graphs_replays_and_skips(monkeypatch):
    from torch._inductor import cudagraph_utils

    fn = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    with compile_counters.counting() as warmup:
        fn(torch.ones(3))
        fn(torch.ones(4))  # another shape: a second graph
    assert warmup["graphs_compiled"] == 2
    stand_in = lambda self: None  # noqa: E731: a CUDA graph's replay, without a GPU
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", stand_in)
    with compile_counters.counting() as timed:
        fn(torch.ones(3))  # seen shape: no recompile
        for _ in range(5):
            torch.cuda.CUDAGraph.replay(object())
        cudagraph_utils.log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
    assert torch.cuda.CUDAGraph.replay is stand_in  # restored
    assert timed == {"cuda_graph_replays": 5, "cuda_graph_skips": 1, "graphs_compiled": 0,
                     "cuda_graph_skip_reasons": ["skipping cudagraphs due to mutated inputs (1 instances)"]}
    summary = compile_counters.summary(warmup, timed, timed_calls=2)
    assert summary["cuda_graph_replays_per_call"] == 2.5 and summary["recompiles_timed"] == 0
    assert summary["graphs_compiled_warmup"] == 2 and summary["cuda_graph_skips"] == 1


# ---------------------------------------------------------------- energy

def _zone(root, name, energy_uj, max_uj=1_000_000):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_counter_adds_packages_and_handles_wrap_around(tmp_path):
    assert energy.rapl_counter(tmp_path) is None  # no zones: no counter
    p0 = _zone(tmp_path, "intel-rapl:0", 999_000)
    _zone(tmp_path, "intel-rapl:1", 10_000)
    _zone(tmp_path, "intel-rapl:0:0", 5)  # a sub-zone (core) of package 0: already in its count
    counter = energy.rapl_counter(tmp_path)
    assert [z.name for z in counter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    start = counter.read()
    (p0 / "energy_uj").write_text("4000\n")  # wrapped at 1e6 µJ: 1000 + 4000 µJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("13000\n")
    assert counter.joules(start, counter.read()) == pytest.approx((5_000 + 3_000) / 1e6)
    (p0 / "energy_uj").unlink()  # unreadable (no privileges): no counter
    assert energy.rapl_counter(tmp_path) is None


class _StandInCounter:
    name, scope = "rapl", "stand-in"

    def __init__(self):
        self.reads = 0

    def read(self):
        self.reads += 1
        return [self.reads]

    def joules(self, start, end):
        return 0.5 * (end[0] - start[0])


def test_run_records_energy_and_compile_counters(tiny_checkpoint, tmp_path, monkeypatch):
    counter = _StandInCounter()
    monkeypatch.setattr(energy, "counter_for", lambda device: counter)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # a real compile takes ~30 s
    proto = Protocol(warmup=1, min_iterations=3, max_iterations=3, batch_size=2, max_new_tokens=8, do_sample=False)
    result = runner.run(runner.RunRequest(TINY, "sdpa+compile", proto, device="cpu", threads=TORCH_THREADS),
                        tmp_path / "bs2.json")
    assert result.status == "ok", result.reason
    rec = result.extra["energy"]
    assert counter.reads == 6 and rec["counter"] == "rapl" and rec["joules_per_call"] == [0.5, 0.5, 0.5]
    assert rec["joules_per_sample"] == pytest.approx(0.25)
    audio = result.iterations.audio_s
    assert rec["joules_per_audio_s"] * 2 * sum(audio) == pytest.approx(1.5)
    compiled = result.extra["compiled"]
    assert compiled["cuda_graph_replays_timed"] == 0 and compiled["recompiles_timed"] == 0
    assert json.loads((tmp_path / "bs2.json").read_text())["energy"] == rec


def test_run_without_an_energy_counter_says_so(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "counter_for", lambda device: None)
    proto = Protocol(warmup=1, min_iterations=1, max_iterations=1, max_new_tokens=8)
    result = runner.run(runner.RunRequest(TINY, "sdpa", proto, device="cpu", threads=TORCH_THREADS),
                        tmp_path / "bs1.json")
    assert result.extra["energy"] == {"counter": None, "reason": energy.NO_COUNTER} and "compiled" not in result.extra


def test_tables_show_energy_and_cuda_graphs(tmp_path):
    paths = [make_run_json(tmp_path, "eager", 1, [1.0] * 4),
             make_run_json(tmp_path, "sdpa+static+compile", 1, [0.5] * 4)]
    with_counter = json.loads(paths[1].read_text())
    with_counter["energy"] = {"counter": "nvml", "scope": "GPU board", "joules_per_call": [8.0] * 4,
                              "joules_per_sample": 8.0, "joules_per_audio_s": 4.0}
    with_counter["compiled"] = {"graphs_compiled_warmup": 3, "recompiles_timed": 0, "cuda_graph_replays_timed": 400,
                                "cuda_graph_replays_per_call": 100.0, "cuda_graph_skips": 1,
                                "cuda_graph_skip_reasons": ["skipping cudagraphs due to cpu device (arg1)"]}
    paths[1].write_text(json.dumps(with_counter))
    runs = tables.cells_table(tables.runs_table(tables.read_runs(paths, tmp_path / "results"), "eager"), "eager")
    md = fragments.tables_md(tables.absolute_table(runs), tables.relative_table(runs, "eager"))
    assert "| J/sample | J/audio s | compiled: graph replays/call, skips, recompiles |" in md
    assert "| 8.000 | 4.000 | 100.0, 1, 0 |" in md
    assert "CUDA graphs skipped in sdpa+static+compile at batch size 1: skipping cudagraphs due to cpu device" in md
    assert "Energy counter: nvml" in md
    no_counter = tables.cells_table(tables.runs_table(tables.read_runs(paths[:1], tmp_path / "results"), "eager"),
                                    "eager")
    md = fragments.tables_md(tables.absolute_table(no_counter), tables.relative_table(no_counter, "eager"))
    assert "Energy: no energy counter on this machine." in md
