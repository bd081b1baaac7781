"""The workflow: a bad config stops it before any job (the checks themselves: test_plan.py); the smoke profile
runs end to end."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# A GPU node runs the engine and `pytest -m cuda` without the workflow's snakemake: skip, do not abort collection.
pytest.importorskip("snakemake", reason="the workflow tests need snakemake (not installed)")

from conftest import BAD_CONFIGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _workflow_copy(tmp_path: Path) -> Path:
    for item in ("Snakefile", "workflow", "config", "report", "envs"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    return tmp_path


def _runs_of(target: Path, work: Path) -> list:
    """The `barkbench run` processes (not their shells) writing `target` in this workflow copy only: another
    test on another pytest-xdist worker may be measuring the same relative target in its own copy."""
    import psutil

    pids = subprocess.run(["pgrep", "-f", f"barkbench run .*{target.relative_to(work)}"], capture_output=True,
                          text=True).stdout.split()
    runs = []
    for pid in map(int, pids):
        try:
            p = psutil.Process(pid)
            if p.name() != "bash" and p.cwd() == str(work.resolve()):
                runs.append(p)
        except psutil.NoSuchProcess:  # pgrep itself, or a run that ended meanwhile
            pass
    return runs


def _snakemake(cwd: Path, *args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)




@pytest.mark.parametrize("bad,message", [
    ("variants: [eager, sdpa\n", ""),  # not YAML
    BAD_CONFIGS[3],  # the protocol's own schema
    BAD_CONFIGS[9],  # one set of optimizations spelled twice
])
def test_bad_config_stops_before_any_job(tmp_path, bad, message):
    work = _workflow_copy(tmp_path)
    (work / "bad.yaml").write_text(bad)
    out = _snakemake(work, "--cores", "1", "report", "--configfile", "bad.yaml")
    assert out.returncode != 0
    assert not (work / "results").exists()
    assert "Traceback" not in out.stderr and message in out.stderr
    assert "Failed validating" not in out.stderr  # one line, no schema dump


@pytest.mark.parametrize("text,message", [
    ("models: [synthetic:tiny\n  variants: [eager]\n", "config/config.yaml:2:11: expected ',' or ']'"),
    ("- eager\n- sdpa\n", "config/config.yaml: must hold keys at top level (a YAML mapping), not a list"),
    ("preset: nonesuch\n", "config: preset: 'nonesuch' is not a file config/<preset>.yaml; presets: gpu-reference, smoke"),
])
def test_bad_config_file_is_named_with_its_line(tmp_path, text, message):
    work = _workflow_copy(tmp_path)
    with open(work / "config" / "config.yaml", "a" if text.startswith("preset") else "w") as handle:
        handle.write(text)
    out = _snakemake(work, "-n", "report")
    text = out.stdout + out.stderr
    assert out.returncode != 0 and message in text, text[-2000:]
    assert "Traceback" not in text


def test_a_section_removed_from_the_config_is_named_in_one_line(tmp_path):
    """A section deleted from config/config.yaml stops the workflow with one line naming it; a run budget
    given for one device only takes no budget for the other."""
    work = _workflow_copy(tmp_path)
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    del config["reproducibility"]
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    out = _snakemake(work, "-n", "report")
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "config: top level: 'reproducibility' is a required property" in text, text[-2000:]
    assert "Traceback" not in text and "KeyError" not in text
    other = "cuda" if "cpu-" in _hardware_id() else "cpu"
    (work / "budget.yaml").write_text(f"run_budget_min: {{{other}: 10}}\n")
    out = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "report", "--configfile", "config/smoke.yaml",
                     "budget.yaml")
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]


def test_prompts_over_the_command_line_limit_stop_before_any_job(tmp_path):
    work = _workflow_copy(tmp_path)
    (work / "long.yaml").write_text(yaml.safe_dump({"prompts": ["Hello. " * 20_000]}))
    out = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "report", "--configfile", "config/smoke.yaml",
                     "long.yaml")
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "config: prompts: the prompts take 137 KiB on a job's command line" in text, text[-2000:]
    assert "Traceback" not in text


def _hardware_id():
    import json

    return json.loads(subprocess.run([sys.executable, "-m", "barkbench", "hardware"], capture_output=True,
                                     text=True, check=True).stdout)["id"]


def test_jobs_run_without_the_environment_on_path(tmp_path, monkeypatch):
    """`.venv/bin/snakemake` without an activated venv: the jobs run the workflow's own interpreter."""
    import json

    monkeypatch.setenv("BARKBENCH_CACHE", os.environ.get("BARKBENCH_CACHE", str(tmp_path / "cache")))
    work = _workflow_copy(tmp_path)
    target = f"results/smoke/{_hardware_id()}/synthetic--tiny/eager/bs1/rep1.json"
    bare = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if d and not (Path(d) / "python").exists() and not (Path(d) / "snakemake").exists())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": bare}
    out = subprocess.run([sys.executable, "-m", "snakemake", target, "--cores", "1", "--configfile",
                          "config/smoke.yaml"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((work / target).read_text())
    assert result["status"] == "ok", result["reason"]


def test_profile_preset_and_configfile_compose(tmp_path):
    """`--profile smoke --configfile other.yaml` runs the smoke config with other.yaml on top (a profile's
    `configfile:` would have been replaced by the command line's); variants get their one spelling."""
    work = _workflow_copy(tmp_path)
    (work / "other.yaml").write_text("variants: [eager, bf16+sdpa]\n")
    out = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "report", "--configfile", "other.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "config = config/config.yaml + config/smoke.yaml (preset) + other.yaml" in out.stderr
    assert "variant 'bf16+sdpa' is written 'sdpa+bf16'" in out.stderr
    jobs = set(re.findall(r"results/smoke/[^/\s]+/([^/\s]+)/([^/\s]+)/bs1/rep1\.json", out.stdout))
    assert jobs == {("synthetic--tiny", "eager"), ("synthetic--tiny", "sdpa+bf16"), ("synthetic--tiny", "control")}


def test_hub_is_asked_once_per_workflow_and_jobs_run_offline(tmp_path):
    work = _workflow_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://10.255.255.1", HF_HOME=str(tmp_path / "hf"),  # unroutable: connect hangs
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "report"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("the Hugging Face hub did not answer within 5 s: jobs run offline") == 1


def test_baseline_from_config_reaches_every_comparison(tmp_path):
    work = _workflow_copy(tmp_path)
    out = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "-p", "report",
                     "--config", "preset=smoke", "baseline=sdpa")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "fidelity/eager.json" in text and "fidelity/sdpa.json" not in text
    assert "--baseline sdpa" in text and "--baseline eager" not in text


def test_a_named_target_is_planned_for_its_declared_device_not_for_this_machine(tmp_path):
    """A hardware folder named with its device (a cluster partition) is planned for that device, whatever the
    submitting machine has (here: no GPU); the jobs then meet the hardware. Named alone, it is refused."""
    work = _workflow_copy(tmp_path)
    out = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "-p", "report",
                     "--config", "hardware=gpu-partition", "device=cuda")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "on gpu-partition (cuda protocol" in text
    assert "results/smoke/gpu-partition/synthetic--tiny/bf16/bs2/rep2.json" in text and "--device cuda" in text
    alone = _snakemake(work, "--profile", "workflow/profiles/smoke", "report", "--config", "hardware=gpu-partition")
    assert alone.returncode != 0 and "Traceback" not in alone.stderr and not (work / "results").exists()
    assert "config: hardware 'gpu-partition' names a target: declare its device too" in alone.stderr


def test_a_cpu_isa_ceiling_plans_every_job_in_the_capped_machines_folder(tmp_path):
    """`cpu_isa: avx2` measures this CPU as an AVX2-only one: every job goes to its own hardware folder (the
    native folder keeps its results); a ceiling that does not exist is refused before any job runs."""
    work = _workflow_copy(tmp_path)
    native = _hardware_id()
    out = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "-p", "report", "--config", "cpu_isa=avx2")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert f"results/smoke/{native}-avx2/synthetic--tiny/eager/bs1/rep1.json" in text
    assert f"results/smoke/{native}/" not in text
    bad = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "report", "--config", "cpu_isa=avx3")
    said = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "config: cpu_isa: 'avx3' is not one of ['native', 'avx2', 'avx512']" in said
    assert "Traceback" not in said


def _json(path):
    import json

    return json.loads(path.read_text())


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path, monkeypatch):
    """The smoke profile renders one self-contained report from exactly its declared results, on its own
    results folder; model-loading jobs never overlap, even with --cores 2; a failed run is attempted again."""
    monkeypatch.setenv("BARKBENCH_CACHE", os.environ.get("BARKBENCH_CACHE", str(tmp_path / "cache")))
    work = _workflow_copy(tmp_path)
    dry = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "report")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "jobs load a model" in dry.stderr and "the run ends within" in dry.stderr  # the printed estimate
    out = _snakemake(work, "--profile", "workflow/profiles/smoke", "--cores", "2", "report", timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    results = work / "results" / "smoke"
    assert sorted(p.name for p in (work / "results").iterdir()) == ["smoke"]  # its own results folder
    html = (results / "report.html").read_text()
    assert "Change vs eager" in html and "Latency" in html
    for name in ("latency", "memory", "throughput", "pareto", "stages", "lengths"):
        assert (results / "figures" / f"{name}.png").exists()
    assert html.count("data:image/png;base64") >= 6
    runs = sorted(results.glob("*/synthetic--tiny/*/bs*/rep*.json")) + sorted(
        results.glob("*/synthetic--tiny/repro/*/*.json"))
    # the probe's estimate, said at start and kept job by job beside the results
    assert "barkbench: probe of" in out.stderr and "the run ends in about" in out.stderr
    planned = _json(next(results.glob("*/estimate.json")))
    assert {str(p.relative_to(work)) for p in runs} <= {j["path"] for j in planned["jobs"]}
    assert {j["kind"] for j in planned["jobs"]} == {"run", "not_applicable", "fidelity", "faults"}
    ok_cells = {p.parent for p in runs if _json(p)["status"] == "ok" and "repro" not in p.parts}
    assert ok_cells and len(re.findall(r"<audio[^>]*src=\"data:audio", html)) == len(ok_cells)  # one per cell
    assert "not applicable on cpu" in html
    assert "A/A control" in html and "Noise check" in html  # the control cell and the check of the noise model
    assert "every fault caught, every correct variant within" in html  # the fault suite's job, in the report
    # interleaved rounds: every cell's process 1 finished before any process 2 started (fp16's records, written
    # together by the job that records what cannot run here, measure nothing)
    rounds = {k: [_json(p) for p in runs if p.name == f"rep{k}.json" and "repro" not in p.parts] for k in (1, 2)}
    assert len(rounds[1]) == len(rounds[2]) == 5  # 4 variants + control, batch size 1
    measured = {k: [r for r in rounds[k] if r["status"] != "not_applicable"] for k in (1, 2)}
    assert len(measured[1]) == len(measured[2]) == 4
    assert max(r["finished_at"] for r in measured[1]) <= min(r["started_at"] for r in measured[2])

    # Exclusive timing: with --cores 2, no two model-loading jobs ran at once (their own start/finish times).
    loading = runs + sorted(results.glob("*/synthetic--tiny/overhead/*/*.json")) + sorted(
        results.glob("*/synthetic--tiny/fidelity/*.json"))
    spans = sorted((_json(p)["started_at"], _json(p)["finished_at"]) for p in loading)
    assert len(spans) == 10 + 3 + 1  # processes (cells x 2), fidelity, overhead (no separate repro)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans

    # A stale JSON of an undeclared variant, and another machine's folder, never reach the report.
    hw = next(p.name for p in results.iterdir() if p.name.startswith("cpu-"))
    eager = results / hw / "synthetic--tiny" / "eager" / "bs1" / "rep1.json"
    stale = results / hw / "synthetic--tiny" / "sdpa+int8" / "bs1" / "rep1.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(eager.read_text().replace('"name": "eager"', '"name": "sdpa+int8"'))
    other = results / "cpu-other-machine-2t" / "synthetic--tiny" / "eager" / "bs1"
    other.mkdir(parents=True)
    (other / "rep1.json").write_text(eager.read_text())

    # A failed run (here: made so by hand) is attempted again by the next invocation, and only it.
    failed = results / hw / "synthetic--tiny" / "sdpa" / "bs1" / "rep2.json"
    data = _json(failed)
    data.update(status="failed", reason="RuntimeError: injected", error={"type": "RuntimeError", "message": "x",
                "traceback": ""}, timing=None, iterations=None, summary=None, memory=None, throughput=None)
    failed.write_text(__import__("json").dumps(data))
    # A corrupt result is measured again too, and so is a deleted one.
    # (the baseline's: bf16's own re-measurement may stop after its warm-up on a CPU without native bf16)
    corrupt = results / hw / "synthetic--tiny" / "eager" / "bs1" / "rep2.json"
    corrupt.write_text("{}")
    deleted = next(results.glob("*/synthetic--tiny/overhead/*/*.json"))
    deleted.unlink()
    again = _snakemake(work, "--profile", "workflow/profiles/smoke", "report", timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{corrupt.relative_to(work)}: schema_version None" in again.stderr  # named, then re-measured
    assert again.stderr.count("rule benchmark:") == 2 and again.stderr.count("rule overhead:") == 1, again.stderr
    assert _json(failed)["status"] == "ok" and _json(failed)["retry_of"].startswith("failed@")
    assert _json(corrupt)["status"] == "ok" and _json(corrupt)["retry_of"].startswith("invalid@")
    assert _json(deleted)["status"] == "ok"
    html = (results / "report.html").read_text()
    assert "sdpa+int8" not in html and "cpu-other-machine" not in html and "injected" not in html
    done = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "report")
    assert "Nothing to be done" in done.stdout + done.stderr

    # A deleted result alone (everything downstream newer) is measured again, named on the console, and the
    # tables, figures and report are rebuilt from it.
    import pandas as pd

    gone = results / hw / "synthetic--tiny" / "sdpa" / "bs1" / "rep1.json"
    tables = results / "tables" / "runs.csv"
    built = tables.stat().st_mtime_ns
    gone.unlink()
    named = f"barkbench: {gone.relative_to(work)} is missing: it is measured again"
    plan = _snakemake(work, "--profile", "workflow/profiles/smoke", "-n", "report")
    assert plan.returncode == 0 and named in plan.stderr, plan.stderr[-3000:]
    planned = re.findall(r"^rule (\w+):", plan.stdout + plan.stderr, re.M)
    assert sorted(planned) == ["aggregate", "benchmark", "figures", "render_report", "report"], planned
    again = _snakemake(work, "--profile", "workflow/profiles/smoke", "report")
    assert again.returncode == 0 and named in again.stderr, again.stderr[-3000:]
    assert again.stderr.count("rule benchmark:") == 1 and "rule aggregate:" in again.stderr
    assert _json(gone)["status"] == "ok" and tables.stat().st_mtime_ns > built
    row = pd.read_csv(tables.with_name("processes.csv")).set_index("path").loc[str(gone.relative_to(work))]
    assert __import__("json").loads(row["latency_s"]) == _json(gone)["iterations"]["latency_s"]


def test_prompts_reach_the_run_byte_for_byte(tmp_path, monkeypatch):
    """Prompts travel as quoted arguments, never interpreted by a shell: Unicode, newlines, quotes and
    shell metacharacters arrive unchanged in the run (a batch of 2 speaks both)."""
    import json

    monkeypatch.setenv("BARKBENCH_CACHE", os.environ.get("BARKBENCH_CACHE", str(tmp_path / "cache")))
    work = _workflow_copy(tmp_path)
    prompts = ["Hello 😀 `touch PWNED` $(touch PWNED2) $5 it's \\ done", '你好\nworld "quoted" ; exit 1']
    (work / "prompts.yaml").write_text(yaml.safe_dump({"prompts": prompts}, allow_unicode=True))
    hw = json.loads(subprocess.run([sys.executable, "-m", "barkbench", "hardware"], capture_output=True,
                                   text=True, check=True).stdout)["id"]
    target = f"results/smoke/{hw}/synthetic--tiny/eager/bs1/rep1.json"
    out = _snakemake(work, target, "--cores", "1", "--configfile", "config/smoke.yaml", "prompts.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((work / target).read_text(encoding="utf-8"))
    assert result["status"] == "ok" and result["protocol"]["prompts"] == prompts
    assert not list(work.glob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


def test_a_second_invocation_on_one_results_folder_is_refused(tmp_path):
    """While one invocation measures into a results folder (it holds the lock), another one stops before
    running any job, with one line."""
    import fcntl

    work = _workflow_copy(tmp_path)
    (work / "results" / "smoke").mkdir(parents=True)
    with open(work / "results" / "smoke" / ".barkbench.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 since now\n")
        held.flush()
        out = _snakemake(work, "--profile", "workflow/profiles/smoke", "report")
    assert out.returncode != 0
    assert "another snakemake is measuring into results/smoke/ (pid 4242 since now)" in out.stderr
    assert sorted(p.name for p in (work / "results" / "smoke").iterdir()) == [".barkbench.lock"]


def test_a_run_killed_mid_loop_leaves_nothing_and_is_measured_again(tmp_path, monkeypatch):
    import json
    import signal
    import time

    monkeypatch.setenv("BARKBENCH_CACHE", os.environ.get("BARKBENCH_CACHE", str(tmp_path / "cache")))
    work = _workflow_copy(tmp_path)
    hw = json.loads(subprocess.run([sys.executable, "-m", "barkbench", "hardware"], capture_output=True,
                                   text=True, check=True).stdout)["id"]
    target = work / f"results/smoke/{hw}/synthetic--tiny/eager/bs1/rep1.json"
    log = work / f"results/smoke/logs/{hw}/synthetic--tiny/eager/bs1/rep1.log"
    (work / "long.yaml").write_text("protocol: {cpu: {min_iterations: 200, max_iterations: 200}}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", str(target.relative_to(work)), "--cores", "1",
                             "--configfile", "config/smoke.yaml", "long.yaml"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (log.exists() and "eager bs1:" in log.read_text()) and time.time() < deadline:
        time.sleep(0.5)  # until the timed loop has started
    runs = _runs_of(target, work)
    assert runs, "the run was not found"
    for run in runs:
        run.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not target.exists() and not list(target.parent.glob(".rep1.json.*"))  # no result, no partial file
    again = _snakemake(work, str(target.relative_to(work)), "--cores", "1", "--configfile", "config/smoke.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(target.read_text())["status"] == "ok"


def test_a_job_whose_shell_is_killed_dies_with_it_and_writes_nothing(tmp_path, monkeypatch):
    """kill -9 of a job's shell (not of its Python process): Snakemake marks the job failed, and the Python
    process goes too instead of writing an `ok` result later."""
    import signal
    import time

    import psutil

    monkeypatch.setenv("BARKBENCH_CACHE", os.environ.get("BARKBENCH_CACHE", str(tmp_path / "cache")))
    work = _workflow_copy(tmp_path)
    hw = _hardware_id()
    target = work / f"results/smoke/{hw}/synthetic--tiny/eager/bs1/rep1.json"
    log = work / f"results/smoke/logs/{hw}/synthetic--tiny/eager/bs1/rep1.log"
    (work / "long.yaml").write_text("protocol: {cpu: {min_iterations: 40, max_iterations: 40}, "
                                    "cuda: {min_iterations: 40, max_iterations: 40}}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", str(target.relative_to(work)), "--cores", "1",
                             "--configfile", "config/smoke.yaml", "long.yaml"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = []
    try:
        deadline = time.time() + 120
        while not (log.exists() and "eager bs1:" in log.read_text()) and time.time() < deadline:
            time.sleep(0.5)  # until the timed loop has started
        job = _runs_of(target, work)
        assert len(job) == 1, "the run was not found"
        shell = job[0].parent()
        assert shell.name() == "bash"
        shell.send_signal(signal.SIGKILL)
        gone, alive = psutil.wait_procs(job, timeout=60)
        assert not alive, "the job outlived its shell"
        proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert not target.exists()
    finally:
        for p in job:
            if p.is_running():
                p.kill()
        if proc.poll() is None:
            proc.kill()
