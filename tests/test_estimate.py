"""The run's estimate: the cost model follows the runner's own stopping rule, and the fitted budget of timed calls
fits the run budget by shortening every process's timed calls, never by leaving a job out."""
from __future__ import annotations

import pytest

from barkbench import estimate, jobwrap, runner
from barkbench.estimate import Probe, Work
from barkbench.protocol import TIMED_BUDGET_ENV, Protocol

PROTOCOL = dict(warmup=1, min_iterations=2, max_iterations=20, budget_s=20.0, time_limit_s=400.0)
PROBE = Probe(startup_s=4.0, load_s=1.5, call_s=6.0, batch_size=1, cpu_features=("avx2", "avx512f"))


def _runner_timed_seconds(call_s: float, budget_s: float) -> float:
    """The timed seconds of one process as the runner decides them, every call taking `call_s`."""
    proto = Protocol(**{**PROTOCOL, "budget_s": budget_s})
    job, latencies = jobwrap.Job(proto.time_limit_s, "protocol"), []
    while runner.stop_reason(proto, latencies, job) is None:
        latencies.append(call_s)
    return sum(latencies)


@pytest.mark.parametrize("call_s", [0.7, 2.0, 3.3, 6.0, 10.0, 15.0])
@pytest.mark.parametrize("budget_s", [0.0, 7.5, 20.0])
def test_a_process_costs_what_the_runner_does_within_half_a_call(call_s, budget_s):
    probe = Probe(startup_s=0.0, load_s=0.0, call_s=call_s, batch_size=1)
    predicted = estimate.run_seconds("eager", 1, probe, PROTOCOL, budget_s) - PROTOCOL["warmup"] * call_s
    assert abs(predicted - _runner_timed_seconds(call_s, budget_s)) <= call_s / 2 + 1e-9


@pytest.mark.parametrize("call_s", [0.7, 2.0, 6.0])
def test_a_process_pays_a_read_of_the_bandwidth_before_its_first_timed_call_and_after_each(call_s):
    read = 0.08
    probe, without = (Probe(startup_s=0.0, load_s=0.0, call_s=call_s, batch_size=1, read_probe_s=r) for r in (read, 0))
    extra = estimate.run_seconds("eager", 1, probe, PROTOCOL, 20.0) - estimate.run_seconds("eager", 1, without,
                                                                                             PROTOCOL, 20.0)
    calls = round(_runner_timed_seconds(call_s, 20.0) / call_s)
    assert abs(extra - (calls + 1) * read) <= read / 2 + 1e-9


def test_a_compiled_variant_pays_its_first_call_and_one_that_cannot_pay_off_is_slower():
    native = Probe(**{**PROBE.to_dict(), "cpu_features": ("avx2", "avx512f", "amx_bf16")})
    plain = estimate.run_seconds("sdpa+bf16", 1, native, PROTOCOL, 20.0)
    assert estimate.run_seconds("sdpa+bf16+compile", 1, native, PROTOCOL, 20.0) > plain  # compiles in its first call
    assert estimate.call_factor("sdpa+bf16", PROBE) > 1.0 > estimate.call_factor("sdpa+bf16", native)


def test_a_hopeless_process_stops_after_its_warm_up_as_the_runner_does():
    slow = Probe(startup_s=0.0, load_s=0.0, call_s=150.0, batch_size=1)
    proto = Protocol(**PROTOCOL)
    job = jobwrap.Job(proto.time_limit_s, "protocol")
    job.start -= 150.0  # the warm-up call took 150 s
    assert runner.stop_reason(proto, [], job, warmup_guess=150.0) == "too_slow"
    assert estimate.run_seconds("eager", 1, slow, PROTOCOL, 20.0) == pytest.approx(150.0)


def _work(n_cells=20):
    cells = [Work("run", v, 1, f"{v}/{k}", "m") for v in ("eager", "sdpa", "sdpa+int8") for k in range(n_cells)]
    return cells + [Work("fidelity", "sdpa", 1, "f/sdpa", "m"), Work("faults", "", 1, "faults", "m"),
                    Work("not_applicable", "fp16", 1, "fp16", "m")]


def test_the_records_of_variants_that_cannot_run_here_cost_one_job_start():
    def seconds(n_records, kind="not_applicable"):
        work = _work()[:-1] + [Work(kind, "fp16", 1, f"fp16/{k}", "m") for k in range(n_records)]
        return estimate.estimate(work, {"m": PROBE}, PROTOCOL, None, fault_cases={"m": 12}).seconds

    assert seconds(0) < seconds(1) == pytest.approx(seconds(30))  # one job writes them all
    assert seconds(30, "not_applicable_job") > seconds(1, "not_applicable_job") > seconds(0)  # one job each


def test_a_run_that_fits_keeps_the_protocols_timed_calls():
    unbounded = estimate.estimate(_work(), {"m": PROBE}, PROTOCOL, None, fault_cases={"m": 12})
    fitted = estimate.estimate(_work(), {"m": PROBE}, PROTOCOL, unbounded.seconds + 1, fault_cases={"m": 12})
    assert not fitted.shortened and fitted.timed_budget_s == PROTOCOL["budget_s"]
    assert fitted.seconds == unbounded.seconds


def test_a_run_over_its_budget_shortens_every_process_and_keeps_every_job():
    unbounded = estimate.estimate(_work(), {"m": PROBE}, PROTOCOL, None, fault_cases={"m": 12})
    budget = unbounded.seconds * 0.9
    fitted = estimate.estimate(_work(), {"m": PROBE}, PROTOCOL, budget, fault_cases={"m": 12})
    assert fitted.shortened and fitted.fits
    assert 0 < fitted.timed_budget_s < PROTOCOL["budget_s"]
    assert fitted.seconds <= budget
    assert [p for p, _, _ in fitted.jobs] == [w.path for w in _work()]  # no job left out
    longer = estimate.estimate(_work(), {"m": PROBE}, {**PROTOCOL, "budget_s": fitted.timed_budget_s + 0.2}, None,
                               fault_cases={"m": 12})
    assert longer.seconds > budget  # the largest budget that fits (to 0.1 s)


def test_a_run_that_cannot_fit_says_so():
    fitted = estimate.estimate(_work(), {"m": PROBE}, PROTOCOL, 60.0, fault_cases={"m": 12})
    assert fitted.shortened and not fitted.fits and fitted.timed_budget_s == 0.0


def test_the_runner_stops_its_timed_calls_at_the_runs_fitted_budget(monkeypatch):
    proto = Protocol(**PROTOCOL)
    job = jobwrap.Job(proto.time_limit_s, "protocol")
    assert runner.stop_reason(proto, [3.0, 3.0, 3.0], job) is None
    monkeypatch.setenv(TIMED_BUDGET_ENV, "8.5")
    assert runner.timed_budget_s(proto) == 8.5
    assert runner.stop_reason(proto, [3.0, 3.0, 3.0], job) == "budget"
    monkeypatch.setenv(TIMED_BUDGET_ENV, "50")  # never longer than the protocol's
    assert runner.timed_budget_s(proto) == PROTOCOL["budget_s"]


def test_a_variant_that_cannot_pay_off_costs_its_warm_up_only_as_the_runner_stops_it():
    no_bf16 = Probe(startup_s=0.0, load_s=0.0, call_s=10.0, batch_size=1, cpu_features=("avx2",))
    call = 10.0 * estimate.call_factor("sdpa+bf16", no_bf16)
    assert call > 10.0  # slower than the baseline's probe: the runner's early verdict
    assert estimate.run_seconds("sdpa+bf16", 1, no_bf16, PROTOCOL, 20.0) == pytest.approx(call)


def test_what_cannot_fit_is_cut_lowest_priority_first():
    work = [Work("run", "eager", 1, f"round{k}/{i}", "m", priority=100 * (3 - k) + i) for k in (1, 2) for i in range(5)]
    work += [Work("faults", "", 1, "faults", "m", priority=0)]
    one = estimate.run_seconds("eager", 1, PROBE, PROTOCOL, 0.0)
    budget = estimate.MARGIN * (estimate.REPORT_S + 6.5 * one)  # six processes and a half fit at min_iterations
    fitted = estimate.estimate(work, {"m": PROBE}, PROTOCOL, budget, fault_cases={"m": 12})
    assert not fitted.fits
    assert fitted.cut == ["round2/3", "round2/2", "round2/1", "round2/0", "faults"]  # round 2 after round 1


def test_the_check_of_a_variant_that_cannot_pay_off_costs_its_start_only_as_the_check_sets_it_aside():
    no_bf16 = Probe(startup_s=3.0, load_s=1.0, call_s=10.0, batch_size=1, cpu_features=("avx2",))
    assert estimate.fidelity_seconds("sdpa+bf16", no_bf16, PROTOCOL) == 3.0
    native = Probe(**{**no_bf16.to_dict(), "cpu_features": ("avx2", "amx_bf16")})
    assert estimate.fidelity_seconds("sdpa+bf16", native, PROTOCOL) > 2 * native.load_s + 10.0


def test_a_combination_of_lossy_formats_costs_its_costliest_check_and_compilation_adds_its_own():
    extra = estimate.fidelity_extra
    # the checks of two lossy formats share their passes: less than both alone, at least the costlier one
    assert max(extra("sdpa+int8"), extra("sdpa+finewin")) <= extra("sdpa+int8+finewin")
    assert extra("sdpa+int8+finewin") < extra("sdpa+int8") + extra("sdpa+finewin")
    # compilation shares nothing with them; an exact variant's check costs no more than the baseline's
    assert extra("sdpa+int8+compile") == pytest.approx(extra("sdpa+int8") + extra("sdpa+compile"))
    assert extra("sdpa") == 0.0 < extra("sdpa+compile")
