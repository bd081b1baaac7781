"""How long a run takes on this machine, said before it starts: a short probe of the machine (one job's start, the
baseline's model load and one call), a cost model of each pending job in the probe's units, and the timed-call
budget per process that fits the run budget (the plan shortens timed calls; it never drops a cell).

The cost model's unit is the probe's baseline call `c` (scaled linearly with the batch size). A job costs its
start (`startup_s`: interpreter, imports, the CPU calibration), its model loads, and its calls. A variant's call is
`c` times its optimizations' `call_factor` (one that cannot pay off on this CPU, e.g. bf16 without native bf16,
`SLOW_WITHOUT_PAYOFF` instead), its first call adds their `first_call_extra` (compilation), a fidelity check costs
`FIDELITY_CALLS` plus their `fidelity_extra` (the largest of its lossy formats', whose checks share passes, plus the
others'), a fault-suite case `FAULT_CASE_CALLS`. These priors are in baseline calls of the machine that runs, so they carry over to a slower or faster one as far as its variants keep their
ratios; they were fitted on one machine (2-core Sapphire Rapids, synthetic bark-small, bs 1, 32 tokens): the calls
on its default run, the fidelity checks and the fault suite job by job. Each run keeps its estimate, job by job, beside its results (<results>/<hardware>/estimate.json), so
its error on another machine can be read off the records' times.
"""
from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import asdict, dataclass

from . import variants

# Priors, in baseline calls (see the module's docstring for where they were measured).
# The fidelity checks and the fault suite on every physical core, as a run (8362897+: each teacher-forced pass once),
# timed one by one on bark-small with an eager call of 19.0 s: sdpa 70 s, sdpa+bf16 57 s, sdpa+int8 75 s,
# sdpa+finewin 85 s, sdpa+int8+finewin 83 s, finewin+ort 151 s; the fault suite 446 s.
FIDELITY_CALLS = 3.4  # the check of a variant: teacher-forced, free-running, batched and chained paths
FAULT_CASE_CALLS = 1.9  # one case of the fault suite at its 8 tokens (its reference and limits kept per format)
SLOW_WITHOUT_PAYOFF = 4.0  # a call of a variant that cannot pay off on this CPU (bf16 emulated: 3-7x, AVX2)
# Seconds: the effective config, tables, figures and report (46 s at the end of a default run on a 2-core CPU), and
# building the 2023 stack's environment when it is not cached.
REPORT_S = 60.0
LEGACY_ENV_S = 90.0
# The estimate is the cost model's sum times this. On the machine the priors were fitted on, the sum came within 2 %
# of one run, and 7 % under the fidelity checks of another (05b8010: 1483 s against 1381 s predicted), where the VM
# drifted: an eager call of 20.2 s at the probe, 18-24 s during the run.
MARGIN = 1.10


@dataclass(frozen=True)
class Probe:
    """This machine, measured once before a run: a job's start, a model load, one baseline call."""

    startup_s: float  # a job's start: spawning the interpreter, its imports and the CPU calibration (timed in a
    # second process: the first one reads cold files)
    load_s: float  # the baseline's model load (the second one: the first may build or read a cold checkpoint)
    call_s: float  # a baseline call at `batch_size` (the second of the process: a timed call's)
    batch_size: int
    first_call_s: float = 0.0  # the first call of the process (a warm-up call's); 0: as call_s
    cpu_features: tuple[str, ...] = ()
    wall_s: float = 0.0  # the probe's own cost
    calibration_s: float = 0.0  # of startup_s: the CPU calibration a measuring job runs first (a job that
    # records why its variant cannot run here skips it)
    read_probe_s: float = 0.0  # CPU: one read of the bandwidth and of the fine format's GEMM (fp32, the baseline's),
    # made before the first timed call and after each

    def call_at(self, batch_size: int, first: bool = False) -> float:
        return (self.first_call_s if first and self.first_call_s else self.call_s) * batch_size / self.batch_size

    def to_dict(self) -> dict:
        return {**asdict(self), "cpu_features": list(self.cpu_features)}


def measure_probe(req, start_only: bool = False) -> dict:
    """The child's side of the probe (`barkbench probe`): the CPU calibration a job runs first, two loads of the
    baseline and two calls, each timed (`start_only`: the calibration only). `req`: a `runner.RunRequest`."""
    import torch

    from . import calibration, provenance, runner

    ready = time.perf_counter()
    device = provenance.resolve_device(req.device)
    variant = variants.parse(req.variant)
    cal = calibration.measure() if device.type == "cpu" else None
    calibrated = time.perf_counter() - ready
    if start_only:
        return {"calibration_s": calibrated}
    read_probe_s = 0.0
    if cal is not None:
        start = time.perf_counter()
        calibration.read_bandwidth_now(calibration.fastest_read_kernel(cal))
        calibration.gemm_rate_now("fp32", calibration.fastest_gemm_kernel(cal, "fp32"))
        read_probe_s = time.perf_counter() - start
    job = runner.job_time_limit(req.protocol.time_limit_s, time.time())
    result = runner.base_result(req, device, variant)
    first = runner.load_model(req, result, variant, device, job)  # may build or read a cold checkpoint
    first_load_s = first.load_s
    del first
    loaded = runner.load_model(req, result, variant, device, job)
    calls = []
    for _ in range(2):  # a warm-up call's time, then a timed call's
        start = time.perf_counter()
        loaded.call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        calls.append(time.perf_counter() - start)
    return {"calibration_s": calibrated, "first_load_s": first_load_s, "load_s": loaded.load_s,
            "first_call_s": calls[0], "call_s": calls[1], "batch_size": req.protocol.batch_size,
            "cpu_features": provenance.cpu_features(), "read_probe_s": read_probe_s}


def _timed_run(command: list[str], timeout_s: float) -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["probe failed"])[-1])
    return wall, json.loads(out.stdout.strip().splitlines()[-1])


def run_probe(command: list[str], timeout_s: float) -> Probe:
    """Run `command` (`python -m barkbench probe ...`, printing `measure_probe`'s JSON on its last line), then the
    same with --start-only, timed from outside: a job's start, with the files its first process read now warm.
    Raises RuntimeError with the last stderr line of a probe that failed."""
    wall, inside = _timed_run(command, timeout_s)
    start_s, started = _timed_run([*command, "--start-only"], timeout_s)
    return Probe(startup_s=start_s, load_s=inside["load_s"], call_s=inside["call_s"],
                 first_call_s=inside["first_call_s"], batch_size=inside["batch_size"],
                 cpu_features=tuple(inside["cpu_features"]), wall_s=wall + start_s,
                 calibration_s=started["calibration_s"], read_probe_s=inside.get("read_probe_s", 0.0))


# ---------------------------------------------------------------- the cost model

@dataclass(frozen=True)
class Work:
    """One pending job of a run: `kind` run (a cell's process, the A/A control's, a repro or overhead process),
    fidelity, faults, or a record of why its variant cannot run here (it loads nothing): not_applicable (written with
    the others in one job) or not_applicable_job (a job of its own)."""

    kind: str
    variant: str
    batch_size: int = 1
    path: str = ""
    model: str = ""  # the model's folder: its probe
    priority: int = 0  # the workflow's: with one job at a time, the ready job of highest priority starts


def _extra(variant: str, attribute: str) -> float:
    return sum(getattr(o, attribute) for o in variants.parse(variant).optimizations)


def fidelity_extra(variant: str) -> float:
    """What a variant's fidelity check costs beyond the baseline's, in baseline calls. The checks of its lossy
    formats (those with a reference simulation) share one teacher-forced pass of the candidate and the reference's
    memo, so they cost the largest of their extras (measured: int8+finewin 1.6 calls, against 0.9 and 1.5 alone);
    the others (compilation, a static cache's decode lengths) add theirs."""
    opts = variants.parse(variant).optimizations
    lossy = [o.fidelity_extra for o in opts if o.reference]
    return max(lossy, default=0.0) + sum(o.fidelity_extra for o in opts if not o.reference)


def call_factor(variant: str, probe: Probe) -> float:
    """A call of `variant` in calls of the baseline: its optimizations' factors; one that cannot pay off on this
    CPU (e.g. bf16 without native bf16) counts `SLOW_WITHOUT_PAYOFF` instead of its factor."""
    features = probe.cpu_features
    return math.prod(SLOW_WITHOUT_PAYOFF if features and o.pays_off_on(features) else o.call_factor
                     for o in variants.parse(variant).optimizations)


def run_seconds(variant: str, batch_size: int, probe: Probe, protocol: dict, timed_budget_s: float) -> float:
    """One process of a cell: start, load, warm-up (its first call compiles), timed calls until the budget (the
    last one crosses it: half a call over, on average), each stop of the runner's as it decides it."""
    factor = call_factor(variant, probe)
    call = probe.call_at(batch_size) * factor
    warmup = (probe.call_at(batch_size, first=True) * factor + (protocol["warmup"] - 1) * call
              + _extra(variant, "first_call_extra") * probe.call_at(1))  # a compiled variant compiles once
    limit = protocol["time_limit_s"]
    parsed = variants.parse(variant)
    # the runner's early verdicts: a variant that cannot pay off on this CPU and is slower than the baseline, or
    # one whose minimum calls cannot end within the time limit, stops after its warm-up
    cannot_pay_off = probe.cpu_features and parsed.pays_off_on(probe.cpu_features) is not None
    if (cannot_pay_off and not parsed.compiles and call > probe.call_at(batch_size)) or (
            probe.load_s + warmup + protocol["min_iterations"] * call > limit):
        return probe.startup_s + min(limit, probe.load_s + warmup)
    budget = min(timed_budget_s, protocol["budget_s"])
    timed = min(max(protocol["min_iterations"] * call, budget + call / 2), protocol["max_iterations"] * call)
    timed += (timed / call + 1) * probe.read_probe_s  # the bandwidth and GEMM reads around the timed calls (CPU)
    return probe.startup_s + min(limit, probe.load_s + warmup + timed)


def fidelity_seconds(variant: str, probe: Probe, protocol: dict) -> float:
    if probe.cpu_features and variants.parse(variant).pays_off_on(probe.cpu_features):
        return probe.startup_s  # recorded as not checked in this run (fidelity.set_aside_in_this_run)
    # half the check's calls are the baseline's (or its reference simulation's), half the variant's
    calls = FIDELITY_CALLS * (1 + call_factor(variant, probe)) / 2 + fidelity_extra(variant)
    return probe.startup_s + min(protocol["time_limit_s"], 2 * probe.load_s + calls * probe.call_at(1))


def faults_seconds(cases: int, probe: Probe) -> float:
    return probe.startup_s + probe.load_s + cases * FAULT_CASE_CALLS * probe.call_at(1)


def job_seconds(work: Work, probe: Probe, protocol: dict, timed_budget_s: float, fault_cases: int) -> float:
    """`fault_cases`: the cases the fault suite judges on this model's machine."""
    if work.kind == "not_applicable":  # one record of the job that writes them all (its start: `estimate`)
        return 0.0
    if work.kind == "not_applicable_job":
        return probe.startup_s - probe.calibration_s
    if work.kind == "fidelity":
        return fidelity_seconds(work.variant, probe, protocol)
    if work.kind == "faults":
        return faults_seconds(fault_cases, probe)
    return run_seconds(work.variant, work.batch_size, probe, protocol, timed_budget_s)


@dataclass(frozen=True)
class Estimate:
    """What the run is expected to take, and the timed-call budget per process that fits its run budget."""

    seconds: float  # the pending jobs, the stack's environment when it is built, and the report, times MARGIN
    timed_budget_s: float  # per process; the protocol's budget_s when the run fits without shortening
    shortened: bool  # the timed-call budget was shortened to fit the run budget
    fits: bool  # the run fits its budget (False: even at min_iterations, it does not)
    jobs: list  # (path, kind, predicted seconds)
    probes: dict  # model folder -> Probe
    cut: list = ()  # when it does not fit: the jobs the deadline would leave out, in the workflow's priority order

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "timed_budget_s": self.timed_budget_s, "shortened": self.shortened,
                "fits": self.fits, "cut": list(self.cut), "probes": {m: p.to_dict() for m, p in self.probes.items()},
                "jobs": [{"path": p, "kind": k, "seconds": s} for p, k, s in self.jobs]}


def estimate(work: list[Work], probes: dict, protocol: dict, budget_s: float | None, fault_cases: dict,
             legacy_env_pending: bool = False) -> Estimate:
    """The run's expected seconds (each job by its model's probe in `probes`; `fault_cases`: per model, the cases
    its fault suite judges there) with the protocol's timed-call budget; when that exceeds `budget_s` (None: no budget), the largest timed-call budget per process that fits
    it, not below min_iterations' calls (then `fits` is False)."""
    fixed = REPORT_S + (LEGACY_ENV_S if legacy_env_pending else 0.0)
    fixed += sum(probes[m].startup_s - probes[m].calibration_s  # the job that records why (one per model)
                 for m in {w.model for w in work if w.kind == "not_applicable"})

    def seconds(w: Work, timed_budget: float) -> float:
        return job_seconds(w, probes[w.model], protocol, timed_budget, fault_cases.get(w.model, 0))

    def total(timed_budget: float) -> float:
        return MARGIN * (fixed + sum(seconds(w, timed_budget) for w in work))

    full = float(protocol["budget_s"])
    timed_budget, shortened, fits = full, False, True
    if budget_s is not None and total(full) > budget_s:
        shortened = True
        low, high = 0.0, full  # total() does not decrease as the timed budget grows
        if total(low) > budget_s:
            timed_budget, fits = low, False
        else:
            for _ in range(40):
                mid = (low + high) / 2
                low, high = (mid, high) if total(mid) <= budget_s else (low, mid)
            timed_budget = math.floor(low * 10) / 10
    cut = []
    if not fits:  # the deadline leaves out what would start after it, lowest priority last (sorted is stable)
        spent = MARGIN * fixed
        for w in sorted(work, key=lambda w: -w.priority):
            spent += MARGIN * seconds(w, timed_budget)
            if spent > budget_s:
                cut.append(w.path)
    return Estimate(total(timed_budget), timed_budget, shortened, fits,
                    [(w.path, w.kind, seconds(w, timed_budget)) for w in work], dict(probes), cut)
