"""The workflow on a SLURM cluster through Snakemake's executor plugin: every job submitted with sbatch, the
hardware folder named by the submitter, the hardware measured on the node. Needs a cluster on this machine:
tests/slurm/cluster-up brings up a single-node one (as root); README's test command then runs it with the rest."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("snakemake", reason="the SLURM workflow test needs snakemake (not installed)")
from test_workflow import _json, _snakemake, _workflow_copy  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TARGET = "slurm-test"  # the hardware folder the submitter names
# The smoke profile, smaller: a variant that runs, one recorded as not applicable here (by the job that records them
# all), the baseline; no fault suite. The SLURM run and the local run it is compared with both take it.
SMALL = "slurm-smoke.yaml"
SMALL_CONFIG = {"variants": ["eager", "sdpa", "fp16"],
                "fidelity": {"enabled": True, "tokens": 16, "faults": False, "fault_tokens": 8}}


@pytest.fixture(scope="module")
def partition():
    """The partition of the test cluster, brought up beforehand by tests/slurm/cluster-up (as root: the test
    installs nothing). Without it the test is skipped, unless BARKBENCH_REQUIRE_SLURM=1 (CI) makes that a failure."""
    up = shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h", "-p", "barkbench", "-t", "idle,mixed,allocated"], capture_output=True,
        text=True).stdout.strip() != ""
    if not up:
        message = "no SLURM test cluster: run tests/slurm/cluster-up as root first"
        if os.environ.get("BARKBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(message + " (BARKBENCH_REQUIRE_SLURM=1)")
        pytest.skip(message)
    return "barkbench"


def _node_cores():
    # The partition's node: all its cores for a model-loading job, as the profile asks on a real cluster.
    out = subprocess.run(["sinfo", "-h", "-p", "barkbench", "-o", "%c"], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0].rstrip("+"))


def _slurm(work, partition, *args):
    cores = _node_cores()
    return _snakemake(
        work, "--profile", "workflow/profiles/slurm", *args, "--configfile", "config/smoke.yaml", SMALL,
        "--default-resources", f"slurm_partition={partition}", "mem_mb=2000", "runtime=30",
        "--set-threads", *(f"{rule}={cores}" for rule in ("benchmark", "reproducibility", "overhead", "fidelity")),
        # no accounting database on the test cluster: job states from squeue (finished jobs stay MinJobAge)
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5", timeout=3600)


def _shape(html: str, hardware: str) -> dict:
    """What a report consists of, without its numbers: headings, table columns and rows, figures, audio."""
    html = html.replace(hardware, "HARDWARE")
    return {"headings": re.findall(r"<h[1-4][^>]*>(.*?)</h[1-4]>", html, re.S),
            "table columns": re.findall(r"<thead>(.*?)</thead>", html, re.S),
            "table rows": html.count("<tr"),
            "figures": html.count("data:image/png;base64"),
            "audio": len(re.findall(r"<audio[^>]*src=\"data:audio", html))}


def test_smoke_workflow_through_slurm_measures_the_nodes(tmp_path, monkeypatch, partition):
    monkeypatch.setenv("BARKBENCH_CACHE", os.environ.get("BARKBENCH_CACHE", str(tmp_path / "cache")))
    work = _workflow_copy(tmp_path)
    (work / SMALL).write_text(json.dumps(SMALL_CONFIG))  # JSON is YAML

    # A node without the declared device refuses the job (no result): the submitter only names the target.
    no_gpu = "results/smoke/slurm-gpu/synthetic--tiny/eager/bs1/rep1.json"
    refused = _slurm(work, partition, no_gpu, "--config", "hardware=slurm-gpu", "device=cuda",
                     "--set-resources", "benchmark:gpu=0")  # the test node has no GPU for sbatch to give
    assert refused.returncode != 0
    log = work / "results/smoke/logs/slurm-gpu/synthetic--tiny/eager/bs1/rep1.log"
    assert "device 'cuda' asked for but CUDA is not available" in log.read_text()
    assert not (work / no_gpu).exists()

    # The same report as a local run of the smoke profile (checked below), made meanwhile in a copy of its own:
    # the SLURM run mostly waits between its status checks.
    local_work = tmp_path / "local"
    local_work.mkdir()
    _workflow_copy(local_work)
    (local_work / SMALL).write_text(json.dumps(SMALL_CONFIG))
    with ThreadPoolExecutor(1) as pool:
        local_run = pool.submit(_snakemake, local_work, "--profile", "workflow/profiles/smoke", "--cores", "1", "report",
                                "--configfile", "config/smoke.yaml", SMALL, timeout=3600)
        out = _slurm(work, partition, "report", "--config", f"hardware={TARGET}", "device=cpu")
        local = local_run.result()
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", text))
    rules = re.findall(r"^(?:local)?rule (\w+):", text, re.M)
    with_command = [r for r in rules if r not in ("report", "all")]  # target rules have no command to run
    assert len(submitted) == len(with_command) > 0, (submitted, rules)
    assert "localrule" not in text.replace("localrule report:", "")  # nothing ran on the submitting machine
    states = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T", "--jobs",
                             ",".join(submitted.values())], capture_output=True, text=True, check=True).stdout
    assert dict(line.split("|") for line in states.split()) == {i: "COMPLETED" for i in submitted.values()}

    # Each measuring job's record: the node it ran on and its SLURM job, under the folder the submitter named.
    results = work / "results" / "smoke"
    folder = results / TARGET
    records = sorted(folder.rglob("*.json"))
    assert len(records) == 8 + 2 + 1  # processes (3 cells and the control, 2 each), fidelity, overhead
    node = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%n"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    measured = set()
    for path in records:
        hw = _json(path)["hardware"]
        assert hw["slurm_job_id"] in submitted.values() and hw["node"] == node, (path, hw)
        measured.add(hw["id"])
    assert len(measured) == 1 and TARGET not in measured
    html = (results / "report.html").read_text()
    assert TARGET in html and next(iter(measured)) in html and f">{node}<" in html

    # The same report as the local run of the smoke profile: same sections, tables, figures and audio.
    assert local.returncode == 0, local.stderr[-3000:]
    local_results = local_work / "results" / "smoke"
    local_hw = next(p.name for p in local_results.iterdir() if p.name.startswith("cpu-"))
    local_html = (local_results / "report.html").read_text()
    # --cores 1 exports OMP_NUM_THREADS=1 to every job: the fidelity check still takes the cores a run takes
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count()
    check = next((local_results / local_hw).rglob("fidelity/sdpa.json"))
    run = next((local_results / local_hw).rglob("sdpa/bs1/rep1.json"))
    assert _json(check)["hardware"]["torch_threads"] == _json(run)["hardware"]["torch_threads"] == cores
    assert _shape(html, TARGET) == _shape(local_html, local_hw)
