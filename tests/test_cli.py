"""The command line as a user runs it (`python -m barkbench`): bad arguments give exit code 2 and one
line on stderr, and nothing is written; a failing run is recorded and exits 0."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from barkbench.records import RunResult
from conftest import TINY, TORCH_THREADS

GOOD = ["--model", TINY, "--variant", "sdpa", "--device", "cpu", "--min-iterations", "1", "--max-iterations", "1",
        "--warmup", "1", "--max-new-tokens", "8", "--threads", str(TORCH_THREADS)]


def _with(args, **changes):
    """GOOD with some options replaced (value None: option removed)."""
    args = list(args)
    for option, value in changes.items():
        flag = "--" + option.replace("_", "-")
        i = args.index(flag)
        if value is None:
            del args[i:i + 2]
        else:
            args[i + 1] = value
    return args


# Run as a user would, in a subprocess.
BAD = {
    "unknown-optimization": (["run", *_with(GOOD, variant="sdpa+turbo")], "turbo"),
    "min-iterations-0": (["run", *_with(GOOD, min_iterations="0")], "min-iterations must be >= 1 (got 0)"),
    "fine-temperature-0": (["run", *GOOD, "--fine-temperature", "0"], "fine-temperature must be > 0 (got 0.0)"),
    "batch-size-0": (["run", *GOOD, "--batch-size", "0"], "batch-size"),
    "unknown-model": (["run", *_with(GOOD, model="synthetic:nope")], "synthetic:nope"),
    "length-mode-bogus": (["run", *GOOD, "--length-mode", "bogus"], "bogus"),
    "hub-model-offline-uncached": (["run", *_with(GOOD, model="suno/bark-small", variant="eager")],
                                   "synthetic:bark-small"),
}

# The same error path, checked in-process through cli.main (each subprocess costs a torch import).
BAD_IN_PROCESS = {
    "conflicting-optimizations": (["run", *_with(GOOD, variant="fp16+bf16")], "fp16"),
    "iterations-not-a-number": (["run", *_with(GOOD, max_iterations="three")], "three"),
    "warmup-0": (["run", *_with(GOOD, warmup="0")], "warmup must be >= 1 (got 0)"),
    "seed-negative": (["run", *GOOD, "--seed", "-1"], "seed must be >= 0 (got -1)"),
    "max-new-tokens-too-many": (["run", *_with(GOOD, max_new_tokens="100000")],
                                "max-new-tokens must be <= 768 (got 100000)"),
    "min-above-max": (["run", *_with(GOOD, min_iterations="5", max_iterations="2")],
                      "max-iterations must be >= min-iterations (got 2 < 5)"),
    "coarse-temperature-negative": (["run", *GOOD, "--coarse-temperature", "-0.5"], "coarse-temperature must be > 0"),
    "budget-negative": (["run", *GOOD, "--budget-s", "-1"], "budget-s must be >= 0"),
    "time-limit-0": (["run", *GOOD, "--time-limit-s", "0"], "time-limit-s must be > 0"),
    "budget-nan": (["run", *GOOD, "--budget-s", "nan"], "budget-s must be a finite number"),
    "threads-0": (["run", *_with(GOOD, threads="0")], "threads"),
    "unknown-device": (["run", *_with(GOOD, device="tpu")], "tpu"),
    "missing-model": (["run", *_with(GOOD, model=None)], "--model"),
    "unknown-command": (["benchmark"], "benchmark"),
    "no-command": ([], "command"),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, barkbench_cache, tiny_checkpoint):
    """Every CLI call of this module, run a few at a time (each one mostly imports torch)."""
    import os

    from conftest import SRC

    tmp = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "BARKBENCH_CACHE": str(barkbench_cache), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"),  # an empty Hugging Face cache
           "OMP_NUM_THREADS": str(TORCH_THREADS),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    env.pop("HF_HUB_CACHE", None)
    calls = {}
    for name, (argv, _) in BAD.items():
        out = tmp / name / "res" / "bs1.json"
        calls[name] = (argv + ["--out", str(out)] if argv and "--out" not in argv else argv, out)
    calls["help"] = (["--help"], None)
    calls["run-help"] = (["run", "--help"], None)
    calls["fail-with"] = (["run", *GOOD, "--out", str(tmp / "failed" / "bs1.json"), "--fail-with", "boom"],
                          tmp / "failed" / "bs1.json")
    calls["ok"] = (["run", *GOOD, "--greedy", "--prompt", "Hello world", "--retry-of", "sdpa-bs1-1",
                    "--out", str(tmp / "ok" / "bs1.json")], tmp / "ok" / "bs1.json")

    def call(item):
        name, (argv, out) = item
        proc = subprocess.run([sys.executable, "-m", "barkbench", *argv], capture_output=True, text=True, env=env,
                              cwd=tmp, timeout=300)
        return name, (proc, out)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(call, calls.items()))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_arguments_exit_2_with_one_line(cli_runs, name):
    proc, out = cli_runs[name]
    expected = BAD[name][1]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("barkbench: error:")
    assert expected in lines[0]
    assert proc.stdout == ""
    if out is not None:
        assert not out.exists()
        assert not out.parent.exists()  # not even the folder


@pytest.mark.parametrize("name", list(BAD_IN_PROCESS))
def test_bad_arguments_in_process(name, tmp_path, capsys, monkeypatch):
    from barkbench import cli, models

    def no_load(*a, **k):  # had it been called, the run would be recorded failed: a file, and exit 0
        raise AssertionError("bad arguments must be refused before any model is loaded")

    monkeypatch.setattr(models, "resolve", no_load)
    monkeypatch.setattr(models, "load", no_load)
    argv, expected = BAD_IN_PROCESS[name]
    out = tmp_path / "res" / "bs1.json"
    code = cli.main(argv + ["--out", str(out)] if argv[:1] == ["run"] else argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("barkbench: error:"), captured.err
    assert expected in lines[0]
    assert captured.out == ""
    assert not out.parent.exists()


def test_top_level_help(cli_runs):
    proc, _ = cli_runs["help"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: barkbench")
    for command in ("run", "hardware", "build-synthetic", "aggregate", "figures", "fidelity", "render"):
        assert command in proc.stdout
    assert "Traceback" not in proc.stderr


def test_run_help(cli_runs):
    proc, _ = cli_runs["run-help"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: barkbench run")
    for option in ("--model", "--variant", "--out", "--batch-size", "--min-iterations", "--max-iterations",
                   "--budget-s", "--time-limit-s", "--warmup", "--max-new-tokens", "--length-mode", "--greedy",
                   "--fine-temperature", "--coarse-temperature", "--seed", "--prompt", "--offline-fallback",
                   "--threads"):
        assert option in proc.stdout
    assert "--iterations " not in proc.stdout and "--do-sample" not in proc.stdout
    assert "--fail-with" not in proc.stdout and "--retry-of" not in proc.stdout  # hidden


def test_forced_failure_exits_0_and_records_it(cli_runs):
    proc, out = cli_runs["fail-with"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "sdpa bs1: failed (RuntimeError: boom)" in proc.stderr.strip().splitlines()[-1]
    result = RunResult.from_json(out).to_dict()
    assert result["status"] == "failed"
    assert result["reason"] == "RuntimeError: boom"
    assert result["error"]["message"] == "boom"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bs1.json"]


def test_successful_run(cli_runs):
    proc, out = cli_runs["ok"]
    assert proc.returncode == 0, proc.stderr
    assert "sdpa bs1: ok (median " in proc.stderr.strip().splitlines()[-1]
    result = RunResult.from_json(out).to_dict()
    assert result["status"] == "ok"
    assert result["protocol"]["prompts"] == ["Hello world"]
    assert result["protocol"]["do_sample"] is False
    assert result["protocol"]["min_iterations"] == result["protocol"]["max_iterations"] == 1
    assert result["protocol"]["warmup"] == 1 and result["protocol"]["budget_s"] == 600.0
    assert result["timing"]["stopped_by"] == "max_iterations"
    assert result["retry_of"] == "sdpa-bs1-1"
    assert result["hardware"]["torch_threads"] == TORCH_THREADS
    assert result["iterations"]["semantic_tokens"] == [8]
    assert sorted(p.name for p in out.parent.iterdir()) == ["bs1.json", "bs1.wav"]
    assert json.loads(out.read_text())["model"]["id"] == TINY


def test_out_that_is_a_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from barkbench import cli, models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["run", *GOOD, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a folder" in err


@pytest.mark.parametrize("content,message", [(None, "cannot read"), ("", "empty file"),
                                             ('{"schema_version": 2', "not valid JSON")])
def test_aggregate_names_a_missing_or_corrupt_file(tmp_path, capsys, content, message):
    from barkbench import cli

    path = tmp_path / "results" / "cpu-x" / "synthetic--tiny" / "eager" / "bs1.json"
    if content is not None:
        path.parent.mkdir(parents=True)
        path.write_text(content)
    code = cli.main(["aggregate", "--results-dir", str(tmp_path / "results"), "--baseline", "eager",
                     "--runs", str(path), "--out-dir", str(tmp_path / "tables")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and str(path) in err and message in err
    assert not (tmp_path / "tables").exists()


def test_each_records_the_variants_that_cannot_run_here_in_one_process(tmp_path, capsys):
    """`barkbench each`: the workflow's one job for the variants that cannot run on this device (fp16 on a CPU), a
    cell's process and a fidelity check, each written as it would be by its own command."""
    from barkbench import cli
    from barkbench.records import FidelityResult

    run_out, check_out = tmp_path / "fp16" / "bs1" / "rep1.json", tmp_path / "fidelity" / "fp16.json"
    commands = [["run", *_with(GOOD, variant="fp16"), "--out", str(run_out)],
                ["fidelity", "--model", TINY, "--variant", "fp16", "--device", "cpu", "--threads", str(TORCH_THREADS),
                 "--out", str(check_out)]]
    assert cli.main(["each", json.dumps(commands)]) == 0
    capsys.readouterr()
    run = RunResult.from_json(run_out)
    assert run.status == "not_applicable" and "fp16" in run.reason and run.variant["name"] == "fp16"
    check = FidelityResult.from_json(check_out)
    assert check.status == "not_applicable" and check.variant == "fp16"
    for bad, message in [("not json", "Expecting value"), ('[["aggregate"]]', "each starting with one of"),
                         ('[["run", 1]]', "each starting with one of"), ('{"run": []}', "a JSON list")]:
        assert cli.main(["each", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("barkbench: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("option", ["--threads", "--tokens"])
def test_the_fault_suite_refuses_a_count_below_one_before_loading_anything(option, capsys):
    from barkbench import faults

    with pytest.raises(SystemExit) as exc:
        faults.main(["synthetic:tiny", option, "0"])
    assert exc.value.code == 2
    assert f"{option}: {option[2:]} must be >= 1 (got 0)" in capsys.readouterr().err
