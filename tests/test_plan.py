"""The workflow's decisions (barkbench.plan), without Snakemake: a bad config is refused in one line that names
where, variants get one spelling from the registry, the files a config declares, the interleaved rounds, the
estimate, retry tokens and the results lock."""
from __future__ import annotations

import copy
import fcntl
import json
import os
import sys
import time
from pathlib import Path

import pytest

from barkbench import layout, plan, variants
from barkbench.protocol import DEADLINE_ENV

from conftest import BAD_CONFIGS, make_run_json

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")
HARDWARE = "cpu-test-xeon"


def _layered(base: dict, top: dict) -> dict:
    """`top` over `base`, nested mappings key by key (as a config file over another)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _layered(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _config(*layers: str, **top) -> dict:
    """config/config.yaml with the named config files and `top` on it, not yet checked."""
    config = plan.read_config_file(str(ROOT / "config" / "config.yaml"))
    for name in layers:
        config = _layered(config, plan.read_config_file(str(ROOT / "config" / name)))
    return _layered(config, top)


def _checked(config: dict, say=lambda line: None) -> dict:
    plan.validate(config, SCHEMA)
    plan.spell_variants(config, say=say)
    return config


@pytest.mark.parametrize("bad,message", BAD_CONFIGS)
def test_a_bad_layered_config_is_refused_in_one_line_naming_where(bad, message):
    """What the workflow says before any job runs (three of these go through Snakemake in test_workflow)."""
    import yaml

    assert message in _refusal(_layered(_config(), yaml.safe_load(bad)))


@pytest.fixture
def smoke():
    return _checked(_config("smoke.yaml"))


def _refusal(config: dict) -> str:
    with pytest.raises(plan.PlanError) as err:
        _checked(config)
    message = str(err.value)
    assert "\n" not in message and "Failed validating" not in message
    return message


# ---------------------------------------------------------------- composing the config files

@pytest.mark.parametrize("layers", [(), ("smoke.yaml",), ("gpu-reference.yaml",)])
def test_the_shipped_configs_are_valid(layers):
    config = _checked(_config(*layers))
    assert config["baseline"] in config["variants"]


def test_a_config_file_with_a_yaml_error_is_named_by_line_and_column(tmp_path):
    (tmp_path / "bad.yaml").write_text("models: [synthetic:tiny\n  variants: [eager]\n")
    with pytest.raises(plan.PlanError, match=r"bad\.yaml:2:11: expected ',' or ']'"):
        plan.read_config_file(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- eager\n- sdpa\n")
    with pytest.raises(plan.PlanError, match=r"list\.yaml: must hold keys at top level \(a YAML mapping\), not a list"):
        plan.read_config_file(str(tmp_path / "list.yaml"))
    with pytest.raises(plan.PlanError, match=r"absent\.yaml: No such file"):
        plan.read_config_file(str(tmp_path / "absent.yaml"))


def test_a_preset_is_a_file_beside_the_config(tmp_path):
    for name in ("config.yaml", "smoke.yaml", "big.yaml"):
        (tmp_path / name).write_text("{}\n")
    assert plan.preset_file("smoke", str(tmp_path)) == f"{tmp_path}/smoke.yaml"
    for preset in ("nonesuch", "config", "../smoke", 3):
        with pytest.raises(plan.PlanError) as err:
            plan.preset_file(preset, str(tmp_path))
        assert str(err.value) == (f"config: preset: {preset!r} is not a file {tmp_path}/<preset>.yaml; "
                                  "presets: big, smoke")


def test_the_composition_is_said_in_the_order_it_applies():
    line = plan.config_sources("smoke", ["other.yaml", "more.yaml"], {"results": "r", "replicates": 3})
    assert line == ("barkbench: config = config/config.yaml + config/smoke.yaml (preset) + other.yaml + more.yaml"
                    " + --config results=r + --config replicates=3 (later ones win)")
    assert plan.config_sources(None, [], {}) == "barkbench: config = config/config.yaml (later ones win)"


# ---------------------------------------------------------------- the config, checked before any job runs

@pytest.mark.parametrize("top,message", [
    ({"batch_sizes": {"cpu": [1, -8]}}, "config: batch_sizes.cpu.1: -8 is less than the minimum of 1"),
    ({"batch_sizes": {"cpu": [1.0]}}, "config: batch_sizes.cpu: [1.0] must be whole numbers written as such, e.g. [1, 8]"),
    ({"device": "tpu"}, "config: device: 'tpu' does not match"),
    ({"models": ["suno/bark-huge"]}, "config: models.0: 'suno/bark-huge' does not match"),
    ({"prompts": []}, "config: prompts: [] should be non-empty"),
    ({"colour": "blue"}, "config: top level: Additional properties are not allowed ('colour' was unexpected)"),
    ({"variants": ["eager", "sdpa bf16"]}, "config: variants.1: 'sdpa bf16' does not match"),
    ({"protocol": {"cpu": {"min_iterations": 0}}}, "config: protocol.cpu.min_iterations: 0 is less than the minimum"),
    ({"protocol": {"cuda": {"length_mode": "whatever"}}}, "config: protocol.cuda.length_mode: 'whatever' is not one of"),
    ({"protocol": {"cpu": {"iterations": 3}}}, "config: protocol.cpu: Additional properties are not allowed"),
    ({"protocol": {"sampling": {"fine_temperature": 0}}}, "config: protocol.sampling.fine_temperature: 0 is less than"),
    ({"prompts": ["Hello. " * 20_000]}, "config: prompts: the prompts take 137 KiB on a job's command line"),
])
def test_a_bad_config_is_refused_in_one_line_naming_where(top, message):
    assert _refusal(_config("smoke.yaml", **top)).startswith(message)


@pytest.mark.parametrize("drop,message", [
    (("reproducibility",), "config: top level: 'reproducibility' is a required property"),
    (("fidelity",), "config: top level: 'fidelity' is a required property"),
    (("overhead", "variants"), "config: overhead: 'variants' is a required property"),
])
def test_a_missing_section_is_named(drop, message):
    config = _config()
    node = config
    for key in drop[:-1]:
        node = node[key]
    del node[drop[-1]]
    assert _refusal(config) == message


def test_validation_fills_the_schemas_defaults():
    config = _config(fidelity={"enabled": False})
    for key in ("offline_fallback", "results", "replicates", "schedule_seed", "run_budget_min"):
        config.pop(key, None)
    config["fidelity"].pop("tokens", None)
    plan.validate(config, SCHEMA)
    assert config["offline_fallback"] == "synthetic"
    assert config["results"] == "results" and config["replicates"] == 2 and config["schedule_seed"] == 0
    assert config["run_budget_min"] == {"cpu": None, "cuda": None}
    assert config["fidelity"] == {"enabled": False, "tokens": 32, "faults": True, "fault_tokens": 8}  # a given value kept


# ---------------------------------------------------------------- variants: one spelling, from the registry

def test_variants_get_their_one_spelling_said_once():
    said = []
    config = _checked(_config("smoke.yaml", variants=["eager", "bf16+sdpa"], baseline="eager",
                              overhead={"variants": {"cpu": ["bf16+sdpa"], "cuda": []}, "batch_size": 1}), said.append)
    assert config["variants"] == ["eager", "sdpa+bf16"]
    assert config["overhead"]["variants"] == {"cpu": ["sdpa+bf16"], "cuda": []}
    assert said == ["barkbench: config variants: variant 'bf16+sdpa' is written 'sdpa+bf16'",
                    "barkbench: config overhead.variants.cpu: variant 'bf16+sdpa' is written 'sdpa+bf16'"]


@pytest.mark.parametrize("top,message", [
    ({"variants": ["eager", "sdpa+bf16", "bf16+sdpa"]},
     "config: variants 'sdpa+bf16' and 'bf16+sdpa' are the same optimizations; keep one"),
    ({"variants": ["eager", "fp16+bf16"]}, "config: variants: variant 'fp16+bf16' combines fp16 and bf16"),
    ({"baseline": "int8"}, "config: baseline 'int8' is not among the variants"),
    ({"baseline": "turbo"}, "config: baseline: unknown optimization 'turbo' in variant 'turbo'; known: eager, "),
    ({"variants": ["eager", "legacy+sdpa"]},
     "config: legacy variants are compared with 'legacy+eager' (the baseline on the 2023 stack): add it"),
    ({"reproducibility": {"variants": {"cpu": ["turbo"], "cuda": []}}},
     "config: reproducibility.variants.cpu: unknown optimization 'turbo'"),
])
def test_variants_that_cannot_be_measured_as_written_are_refused(top, message):
    assert _refusal(_config("smoke.yaml", **top)).startswith(message)


@pytest.fixture
def throwaway():
    """An optimization registered for one test only."""
    name = "throwaway"
    assert name not in variants.REGISTRY
    variants.register(variants.Optimization(name, "a test's own optimization", order=55))
    yield name
    del variants.REGISTRY[name]


def test_a_registered_optimization_is_a_valid_variant_with_no_other_edit(throwaway):
    variant = f"sdpa+{throwaway}"
    config = _checked(_config("smoke.yaml", variants=["eager", variant]))
    assert config["variants"] == ["eager", variant]
    runs = plan.Plan(config, HARDWARE, "cpu").run_jsons()
    assert f"{config['results']}/{HARDWARE}/synthetic--tiny/{variant}/bs1/rep1.json" in runs


def test_an_unknown_optimization_is_refused_in_one_line(throwaway):
    message = _refusal(_config("smoke.yaml", variants=["eager", "sdpa+turbo"]))
    assert message.startswith("config: variants: unknown optimization 'turbo' in variant 'sdpa+turbo'; known: ")
    assert throwaway in message.split("known: ")[1].split(", ")  # the registry's names, this one included


# ---------------------------------------------------------------- the machine and the hub

def test_a_named_target_declares_its_device():
    with pytest.raises(plan.PlanError, match="config: hardware 'gpu-partition' names a target: declare its device too"):
        plan.machine({"hardware": "gpu-partition", "device": "auto"})
    assert plan.machine({"hardware": "gpu-partition", "device": "cuda:1"}) == {"id": "gpu-partition", "device": "cuda"}
    assert plan.machine({"hardware": "cpu-partition", "device": "cpu"}) == {"id": "cpu-partition", "device": "cpu"}


def test_this_machine_is_detected_by_barkbench_hardware(tmp_path):
    found = plan.machine({"device": "cpu"}, python=sys.executable)
    assert found["device"] == "cpu" and found["id"].startswith("cpu-")
    failing = tmp_path / "python"
    failing.write_text("#!/bin/sh\necho 'no such device: tpu' >&2\nexit 2\n")
    failing.chmod(0o755)
    with pytest.raises(plan.PlanError, match="^no such device: tpu$"):
        plan.machine({"device": "cpu"}, python=str(failing))


@pytest.fixture
def hub(monkeypatch):
    from barkbench import models

    asked = []
    state = {"answers": False}

    def answers(model_id, timeout_s):
        asked.append((model_id, timeout_s))
        return state["answers"]

    monkeypatch.setattr(models, "hub_cached", lambda m: m == "suno/bark")
    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(models, "hub_answers", answers)
    return asked, state


def test_a_silent_hub_sends_every_job_offline_once(hub):
    asked, state = hub
    environ, said = {}, []
    config = {"models": ["suno/bark", "suno/bark-small", "synthetic:tiny"], "offline_fallback": "synthetic"}
    assert plan.ask_hub_once(config, said.append, environ=environ)
    assert asked == [("suno/bark-small", plan.HUB_TIMEOUT_S)] and environ == {"HF_HUB_OFFLINE": "1"}
    assert said == ["barkbench: the Hugging Face hub did not answer within 5 s: jobs run offline (suno/bark-small "
                    "not cached: offline_fallback synthetic)"]
    state["answers"] = True
    environ, said = {}, []
    assert not plan.ask_hub_once(config, said.append, environ=environ) and environ == {} and said == []
    asked.clear()
    assert not plan.ask_hub_once({"models": ["synthetic:tiny", "suno/bark"], "offline_fallback": "none"},
                                 said.append, environ=environ)
    assert asked == []  # nothing to fetch: the hub is not asked


# ---------------------------------------------------------------- the plan of one machine

def test_the_plan_takes_this_devices_protocol_and_checks(smoke):
    smoke["overhead"]["variants"] = {"cpu": ["eager"], "cuda": ["sdpa"]}
    cpu = plan.Plan(copy.deepcopy(smoke), HARDWARE, "cpu")
    cuda = plan.Plan(copy.deepcopy(smoke), "gpu-x", "cuda")
    assert cpu.config["overhead"]["variants"] == ["eager"] and cuda.config["overhead"]["variants"] == ["sdpa"]
    assert cpu.protocol["seed"] == smoke["protocol"]["sampling"]["seed"]
    assert cpu.batch_sizes == smoke["batch_sizes"]["cpu"]
    assert cpu.models == {"synthetic--tiny": "synthetic:tiny"}
    changed = copy.deepcopy(smoke)
    changed["protocol"]["cpu"]["max_new_tokens"] += 1
    assert plan.Plan(changed, HARDWARE, "cpu").config_hash != cpu.config_hash
    smoke["overhead"] = {"variants": {"cpu": ["sdpa"], "cuda": []}, "batch_size": 4}
    with pytest.raises(plan.PlanError, match="config: overhead variant 'sdpa' at batch size 4 must also be a "
                                             "benchmarked variant and cpu batch size"):
        plan.Plan(smoke, HARDWARE, "cpu")


def test_run_args_carry_the_protocol_as_separate_arguments(smoke):
    smoke["protocol"]["sampling"]["do_sample"] = False
    smoke["prompts"] = ["it's $(rm -rf) a prompt", "two"]
    p = plan.Plan(smoke, HARDWARE, "cpu")
    args = p.run_args("synthetic--tiny", 2)
    assert args[:6] == ["--model", "synthetic:tiny", "--device", smoke["device"], "--batch-size", "2"]
    assert "--greedy" in args and "--do-sample" not in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--prompt"] == smoke["prompts"]
    assert args[args.index("--config-hash") + 1] == p.config_hash and "--no-stage-timing" not in args
    assert p.run_args("synthetic--tiny", 2, plain=True)[-1] == "--no-stage-timing"


def test_the_declared_files(smoke):
    smoke["results_from"] = ["gpu-other", HARDWARE]
    p = plan.Plan(smoke, HARDWARE, "cpu")

    def folder(path):
        return path.removeprefix(smoke["results"] + "/").split("/")[0]

    runs = p.run_jsons()
    assert runs[0] == f"{smoke['results']}/{HARDWARE}/synthetic--tiny/eager/bs1/rep1.json"
    assert runs[1] == f"{smoke['results']}/{HARDWARE}/synthetic--tiny/eager/bs1/rep2.json"  # the last wildcard fastest
    assert {folder(r) for r in runs} == {HARDWARE, "gpu-other"} and len(runs) == len(set(runs))
    assert sum(f"/{layout.CONTROL_DIR}/" in r for r in p.run_jsons([HARDWARE])) == len(p.batch_sizes) * smoke["replicates"]
    fidelity = p.fidelity_jsons([HARDWARE])
    assert [f.rsplit("/", 1)[1] for f in fidelity] == ["sdpa.json", "bf16.json", "fp16.json"]  # not the baseline
    assert p.overhead_jsons([HARDWARE]) == [f"{smoke['results']}/{HARDWARE}/synthetic--tiny/overhead/eager/bs1.json"]
    assert p.faults_jsons([HARDWARE]) == [f"{smoke['results']}/{HARDWARE}/synthetic--tiny/faults.json"]
    assert {folder(d) for d in p.declared()} == {HARDWARE}
    smoke["fidelity"]["faults"] = False
    assert p.faults_jsons() == [] and p.fidelity_jsons()
    smoke["fidelity"]["enabled"] = False
    assert p.fidelity_jsons() == []


def test_rounds_are_interleaved_in_a_seeded_order(smoke):
    smoke["replicates"] = 3
    p = plan.Plan(copy.deepcopy(smoke), HARDWARE, "cpu")
    cells = p.cells
    assert len(cells) == len(set(cells)) == len(smoke["variants"] + [layout.CONTROL_DIR]) * len(p.batch_sizes)

    def priorities(the_plan, k):
        return {cell: the_plan.round_priority(*cell, k) for cell in cells}

    rounds = [priorities(p, k) for k in (1, 2, 3)]
    assert min(rounds[0].values()) > p.fidelity_priority > max(rounds[1].values())  # fidelity between rounds 1, 2
    assert min(rounds[1].values()) > max(rounds[2].values())  # a round never mixes with the next
    orders = [sorted(cells, key=r.get, reverse=True) for r in rounds]
    assert len({tuple(o) for o in orders}) == 3  # each round its own order
    again = plan.Plan(copy.deepcopy(smoke), HARDWARE, "cpu")
    assert [priorities(again, k) for k in (1, 2, 3)] == rounds  # the same seed, the same order
    other = plan.Plan(dict(copy.deepcopy(smoke), schedule_seed=7), HARDWARE, "cpu")
    assert [priorities(other, k) for k in (1, 2, 3)] != rounds


def test_the_estimate_counts_the_jobs_that_load_a_model_here(smoke, tmp_path):
    smoke["results"] = str(tmp_path / "results")
    smoke["protocol"]["cpu"]["time_limit_s"] = 120
    p = plan.Plan(smoke, HARDWARE, "cpu")
    pending = p.pending_jobs()
    assert not [j for j in pending if "/fp16" in j] and [j for j in p.declared() if "/fp16/" in j]  # no fp16 on cpu
    assert set(pending) == {j for j in p.declared() if "fp16" not in j}
    done = make_run_json(tmp_path, "eager", 1, [1.0, 1.1], hardware=HARDWARE, model="synthetic:tiny")
    assert str(done) in pending and str(done) not in p.pending_jobs()
    failed = make_run_json(tmp_path, "sdpa", 1, [1.0], status="failed", reason="boom", hardware=HARDWARE,
                           model="synthetic:tiny")
    assert str(failed) in p.pending_jobs()  # measured again
    assert p.missing_results() == [j for j in p.declared() if j not in (str(done), str(failed))]
    line = p.estimate(pending[:3])
    assert line.startswith(f"barkbench: 3 jobs load a model on {HARDWARE} (cpu protocol: ")
    # three jobs at their 120 s limit and the minute reserved for the tables, figures and report
    assert "each job stopped at 120 s); the run ends within 7 min, tables, figures and report included" in line
    smoke["run_budget_min"]["cpu"] = 2
    assert "the run ends within 2 min" in p.estimate(pending[:3])
    assert p.estimate([]) is None


def test_the_variants_that_cannot_run_here_are_recorded_by_one_job(smoke, tmp_path):
    smoke["results"] = str(tmp_path / "results")
    smoke["variants"] = [*smoke["variants"], "legacy+bt+fp16"]  # the 2023 stack's: recorded by its own interpreter
    p = plan.Plan(smoke, HARDWARE, "cpu")
    together = p.not_applicable_jobs()
    assert sorted(together) == sorted(j for j in p.declared() if "/fp16" in j)  # fp16's processes and its check
    for path, argv in together.items():
        assert argv[0] in ("run", "fidelity") and argv[argv.index("--variant") + 1] == "fp16"
        assert argv[-2:] == ["--out", path]
        assert argv[1:-2] == ["--variant", "fp16", *(p.run_args("synthetic--tiny", 1) if argv[0] == "run"
                                                      else p.fidelity_args("synthetic--tiny", "fp16"))]
    kinds = {w.path: w.kind for w in p.pending_work()}
    assert {kinds[j] for j in together} == {"not_applicable"}
    assert {k for j, k in kinds.items() if "legacy+bt+fp16" in j} == {"not_applicable_job"}
    assert "run" in kinds.values() and not set(together) & set(p.pending_jobs())


def test_a_written_fault_suite_is_not_pending(smoke, tmp_path):
    """The fault suite's rule makes its record once (no retry token): a run that finds it neither counts it in its
    estimate nor says it is measured again (it is not a run record)."""
    from barkbench import layout

    smoke["results"] = str(tmp_path / "results")
    smoke["fidelity"]["faults"] = True
    p = plan.Plan(smoke, HARDWARE, "cpu")
    kinds = {w.path: w.kind for w in p.pending_work()}
    (path,) = [j for j, k in kinds.items() if k == "faults"]
    assert path.endswith("faults.json") and path in p.faults_jsons([HARDWARE])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"schema_version": 1, "kind": "fault-suite"}))
    said = []
    assert "faults" not in {w.kind for w in p.pending_work(say=said.append)} and not said


def test_a_failed_or_unreadable_result_gets_a_retry_token(tmp_path):
    said = []
    assert plan.retry_args(str(tmp_path / "absent.json"), said.append) == []
    ok = make_run_json(tmp_path, "eager", 1, [1.0, 1.1])
    assert plan.retry_args(str(ok), said.append) == []
    failed = make_run_json(tmp_path, "sdpa", 1, [1.0], status="failed", reason="boom")
    assert plan.retry_args(str(failed), said.append) == ["--retry-of", "failed@2024-01-01T00:01:00"]
    retried = make_run_json(tmp_path, "bf16", 1, [1.0, 1.1])
    record = json.loads(retried.read_text())
    record["retry_of"] = "failed@earlier"
    retried.write_text(json.dumps(record))
    assert plan.retry_args(str(retried), said.append) == ["--retry-of", "failed@earlier"]  # it stays done
    assert said == []
    ok.write_text(ok.read_text()[:100])  # truncated
    token = plan.retry_args(str(ok), said.append)
    assert token == ["--retry-of", f"invalid@{os.path.getmtime(ok):.6f}"]
    assert len(said) == 1 and said[0].startswith("barkbench: ") and said[0].endswith(": it is measured again")


def test_one_measuring_invocation_per_results_folder(tmp_path):
    results = str(tmp_path / "results")
    held = plan.take_results_lock(results)
    try:
        with pytest.raises(plan.PlanError) as err:
            plan.take_results_lock(results)
        assert str(err.value).startswith(f"another snakemake is measuring into {results}/ (pid {os.getpid()} since ")
        assert str(err.value).endswith("wait for it to end, or give this one another `results` folder")
    finally:
        held.close()
    again = plan.take_results_lock(results)  # released with its holder
    again.close()
    with open(os.path.join(results, plan.LOCK_FILE), "a+") as other:  # a lock taken elsewhere, without a holder
        other.truncate(0)
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(plan.PlanError, match=r"\(pid unknown\)"):
            plan.take_results_lock(results)


def test_the_run_budget_is_a_deadline_every_job_inherits():
    environ = {}
    plan.start_run_budget(None, environ)
    assert environ == {}
    plan.start_run_budget(10, environ)
    first = float(environ[DEADLINE_ENV])
    assert time.time() + 8 * 60 < first < time.time() + 10 * 60  # ten minutes from now, less the report's reserve
    plan.start_run_budget(20, environ)  # a deadline already set (an outer invocation's) is kept
    assert float(environ[DEADLINE_ENV]) == first


@pytest.mark.parametrize("budget_min,cuts", [(60, False), (2, True)])
def test_a_run_the_budget_cuts_leaves_room_to_record_what_it_cuts(smoke, tmp_path, monkeypatch, budget_min, cuts):
    """Each job the deadline cuts still starts, to record that it did not run: the jobs' deadline moves earlier for
    them, so that the run ends within its budget; a run that fits keeps its deadline."""
    from barkbench import estimate

    smoke["results"] = str(tmp_path / "results")
    p = plan.Plan(smoke, HARDWARE, "cpu")
    probe = estimate.Probe(startup_s=8.0, load_s=1.0, call_s=5.0, batch_size=1, calibration_s=1.0)
    monkeypatch.setattr(estimate, "run_probe", lambda command, timeout_s: probe)
    environ, said = {}, []
    started = time.time()
    budget_ends = plan.start_run_budget(budget_min, environ, started=started)
    deadline = float(environ[DEADLINE_ENV])
    fitted = plan.begin_run(p, sys.executable, started, budget_ends, False, said.append, environ)
    assert bool(fitted.cut) == cuts and ("the deadline leaves out about" in said[-1]) == cuts
    assert p.not_applicable_jobs() and not set(p.not_applicable_jobs()) & set(fitted.cut)  # recorded first
    moved = deadline - float(environ[DEADLINE_ENV])
    assert (moved >= len(fitted.cut) * (probe.startup_s - probe.calibration_s) > 0) if cuts else moved == 0
    assert json.loads((tmp_path / "results" / HARDWARE / "estimate.json").read_text())["cut"] == list(fitted.cut)
