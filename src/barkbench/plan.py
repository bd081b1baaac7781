"""The workflow's decisions, as plain Python: the config checked and given its one spelling, the machine that is
measured, the hub, the files a config declares, the order of the rounds, the run's estimate, retry tokens and
the results lock. The workflow's rules call into this module; it knows nothing about Snakemake and says a bad
config in one line (`PlanError`) naming where.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields

import yaml

from . import confighash, estimate, isa, jobs, layout, legacy, validation, variants
from .protocol import BASELINE_CALL_ENV, DEADLINE_ENV, TIMED_BUDGET_ENV, Protocol
from .records import FidelityResult, ResultError, RunResult

HUB_TIMEOUT_S = 5.0
SAMPLING = ("do_sample", "fine_temperature", "coarse_temperature", "seed")
PER_RUN = ("batch_size", "prompts")  # set by the workflow per job
LOCK_FILE = ".barkbench.lock"


# The job that records the variants that cannot run here (`Plan.not_applicable_jobs`) runs first: seconds, no model.
NOT_APPLICABLE_PRIORITY = 10**6


class PlanError(ValueError):
    """A config the workflow cannot run, said in one line that names where."""


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


# ---------------------------------------------------------------- composing the config files

def read_config_file(path: str) -> dict:
    """A config file's mapping, with a YAML error named by file, line and column (Snakemake names neither)."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise PlanError(f"{where}: {getattr(exc, 'problem', None) or exc}") from None
    except OSError as exc:
        raise PlanError(f"{path}: {exc.strerror}") from None
    if not isinstance(content, dict):
        raise PlanError(f"{path}: must hold keys at top level (a YAML mapping), not a {type(content).__name__}")
    return content


def preset_file(preset, config_dir: str = "config") -> str:
    """The file of a preset (`smoke` -> config/smoke.yaml), read on top of config/config.yaml."""
    presets = sorted(p.removesuffix(".yaml") for p in os.listdir(config_dir) if p != "config.yaml")
    if not (isinstance(preset, str) and re.fullmatch(r"[a-z0-9_-]+", preset) and preset in presets):
        raise PlanError(f"config: preset: {preset!r} is not a file {config_dir}/<preset>.yaml; "
                        f"presets: {', '.join(presets)}")
    return f"{config_dir}/{preset}.yaml"


def config_sources(preset, configfiles, overrides: dict, config_dir: str = "config") -> str:
    """The composition, in the order it is applied (later ones win): config/config.yaml, the preset, then the
    command line's --configfile and --config."""
    parts = [f"{config_dir}/config.yaml"] + ([f"{config_dir}/{preset}.yaml (preset)"] if preset else [])
    parts += [os.path.relpath(p) for p in configfiles]
    parts += [f"--config {k}={v}" for k, v in overrides.items()]
    return f"barkbench: config = {' + '.join(parts)} (later ones win)"


# ---------------------------------------------------------------- the config, checked before any job runs

def _filling_defaults(validator_class):
    """A validator that fills each property's `default` while it validates (as snakemake's `validate` does)."""
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        for name, sub in props.items():
            if "default" in sub:
                instance.setdefault(name, sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return validation.jsonschema().validators.extend(validator_class, {"properties": properties})


def _first_error(validator, instance) -> None:
    error = next(iter(validator.iter_errors(instance)), None)  # the first, as a validator's `validate` raises
    if error is not None:
        at = ".".join(map(str, error.absolute_path))
        raise PlanError(f"config: {at or 'top level'}: {(error.message.splitlines() or [''])[0][:300]}")


def validate(config: dict, schema_path: str) -> None:
    """Check `config` against the workflow's schema (filling its defaults in place), then what a schema cannot
    say: batch sizes written as whole numbers, prompts that fit a command line, the protocol blocks against
    `Protocol`'s own schema."""
    with open(schema_path, encoding="utf-8") as handle:
        schema = yaml.safe_load(handle)
    _first_error(_filling_defaults(validation.jsonschema().Draft202012Validator)(schema), config)
    for device, sizes in config["batch_sizes"].items():
        if any(not isinstance(b, int) or isinstance(b, bool) for b in sizes):  # JSON Schema takes 1.0 as integer
            raise PlanError(f"config: batch_sizes.{device}: {sizes} must be whole numbers written as such, e.g. [1, 8]")
    overflow = jobs.prompts_overflow(config["prompts"])  # they reach every job on its command line
    if overflow:
        raise PlanError(f"config: prompts: {overflow}")
    all_fields = [f.name for f in fields(Protocol)]
    checks = {"protocol.sampling": (config["protocol"]["sampling"], [f for f in all_fields if f not in SAMPLING])}
    for device in ("cuda", "cpu"):
        checks[f"protocol.{device}"] = (config["protocol"][device], [*SAMPLING, *PER_RUN])
    for where, (block, exclude) in checks.items():
        # The protocol's fields and their constraints live in barkbench.protocol.Protocol, not in the config schema.
        error = validation.first_error(block, Protocol.json_schema(exclude=exclude))
        if error is not None:
            at = ".".join([where, *map(str, error.absolute_path)])
            raise PlanError(f"config: {at}: {error.message[:300]}")


def _spelled(name: str, where: str, say) -> str:
    """A variant in its one spelling (`bf16+sdpa` -> `sdpa+bf16`), so the results of one set of optimizations
    have one name; a renamed one is said once. Its optimizations are the registry's: an unknown one is refused."""
    try:
        spelled = variants.canonical(name)
    except variants.VariantError as exc:
        raise PlanError(f"config: {where}: {exc}") from None
    if spelled != name:
        say(f"barkbench: config {where}: variant {name!r} is written {spelled!r}")
    return spelled


def spell_variants(config: dict, say=to_stderr) -> None:
    """Every variant of `config` in its one spelling, in place; the same optimizations named twice, a baseline
    that is not measured, legacy variants without the baseline on their stack are refused."""
    given = list(config["variants"])
    config["variants"] = [_spelled(v, "variants", say) for v in given]
    for section in ("reproducibility", "overhead"):
        config[section]["variants"] = {d: [_spelled(v, f"{section}.variants.{d}", say) for v in vs]
                                       for d, vs in config[section]["variants"].items()}
    config["baseline"] = _spelled(config["baseline"], "baseline", say)
    for i, variant in enumerate(config["variants"]):
        if variant in config["variants"][:i]:  # e.g. sdpa+bf16 and bf16+sdpa: one variant measured twice
            first = given[config["variants"].index(variant)]
            raise PlanError(f"config: variants {first!r} and {given[i]!r} are the same optimizations; keep one")
    if config["baseline"] not in config["variants"]:
        raise PlanError(f"config: baseline {config['baseline']!r} is not among the variants")
    legacy_baseline = legacy.baseline_for(legacy.PREFIX, config["baseline"])
    if any(map(legacy.is_legacy_variant, config["variants"])) and legacy_baseline not in config["variants"]:
        raise PlanError(f"config: legacy variants are compared with {legacy_baseline!r} (the baseline on the "
                        "2023 stack): add it to the variants")


# ---------------------------------------------------------------- the machine and the hub

def machine(config: dict, python: str = sys.executable, environ=os.environ) -> dict:
    """Hardware folder and device type of the benchmark jobs. A folder named in the config (`hardware`) is a
    target, e.g. a cluster partition: its device type is declared too, and each job measures the node it runs
    on (records its hardware; refuses when the node lacks the device). Otherwise this machine, detected.
    First, the config's instruction-set ceiling (`cpu_isa`, barkbench.isa) is set for this process and every job it
    starts (`environ`): a capped CPU is measured as another machine, in its own folder."""
    ceiling = config.get("cpu_isa", isa.NATIVE)
    isa.set_for_jobs(ceiling, environ)
    if "hardware" in config:
        if config["device"] == "auto":
            raise PlanError(f"config: hardware {config['hardware']!r} names a target: declare its device too "
                            "(device: cpu or device: cuda); the machine that submits is not measured")
        found = {"id": config["hardware"] + isa.folder_suffix(ceiling),
                 "device": "cuda" if config["device"].startswith("cuda") else "cpu"}
    else:
        out = subprocess.run([python, "-m", "barkbench", "hardware", "--device", config["device"]],
                             capture_output=True, text=True, env=dict(environ))
        if out.returncode != 0:
            raise PlanError(out.stderr.strip() or "barkbench hardware failed")
        found = json.loads(out.stdout)
    if found["device"] != "cpu" and ceiling != isa.NATIVE:
        raise PlanError(f"config: cpu_isa {ceiling} caps a CPU's kernels; the jobs run on {found['device']} "
                        "(set device: cpu to measure this machine's CPU under the ceiling)")
    return found


def ask_hub_once(config: dict, say=to_stderr, timeout_s: float = HUB_TIMEOUT_S, environ=os.environ) -> bool:
    """Whether the hub answers is asked once per workflow, with a short timeout: when it does not, every job
    runs offline (cached checkpoint, else the synthetic twin) instead of waiting on the network itself.
    True when the jobs were set to run offline (HF_HUB_OFFLINE in `environ`, inherited by every job)."""
    from . import models

    wanted = [m for m in config["models"] if m in models.HUB_MODELS and not models.hub_cached(m)]
    if wanted and not models.hub_offline() and not models.hub_answers(wanted[0], timeout_s=timeout_s):
        environ.update(HF_HUB_OFFLINE="1")
        say(f"barkbench: the Hugging Face hub did not answer within {timeout_s:g} s: jobs run offline "
            f"({', '.join(wanted)} not cached: offline_fallback {config['offline_fallback']})")
        return True
    return False


# ---------------------------------------------------------------- retry tokens

def retry_args(path: str, say=to_stderr) -> list[str]:
    """`--retry-of TOKEN` when the result at `path` records a failure, or is not a valid record (corrupt,
    truncated, foreign, older schema): the token differs from the params recorded when the job ran, so
    the workflow runs it again; the new result keeps the token, and stays done."""
    if not os.path.exists(path):
        return []
    try:
        record = (FidelityResult if f"/{layout.FIDELITY_DIR}/" in path else RunResult).from_json(path)
    except ResultError as exc:
        say(f"barkbench: {exc}: it is measured again")
        return ["--retry-of", f"invalid@{os.path.getmtime(path):.6f}"]
    token = f"failed@{record.finished_at}" if record.status == "failed" else record.retry_of
    return ["--retry-of", token] if token else []


# ---------------------------------------------------------------- the plan of one machine

def _expand(pattern: str, **wildcards) -> list[str]:
    """Every combination of the wildcards' values (the last one varying fastest), as the workflow's `expand`."""
    values = [[v] if isinstance(v, (str, int)) else list(v) for v in wildcards.values()]
    return [pattern.format(**dict(zip(wildcards, combo))) for combo in itertools.product(*values)]


@dataclass
class Plan:
    """What one invocation measures on one machine (`hardware`, `device`), from a checked and spelled config."""

    config: dict
    hardware: str
    device: str
    protocol: dict = field(init=False)
    batch_sizes: list = field(init=False)
    config_hash: str = field(init=False)
    models: dict = field(init=False)
    hardware_folders: list = field(init=False)
    cells: list = field(init=False)  # (model folder, variant or the control's folder, batch size)
    round_orders: dict = field(init=False)  # round k -> the position of each cell in it

    def __post_init__(self):
        config = self.config
        self.protocol = {**config["protocol"][self.device], **config["protocol"]["sampling"]}
        self.batch_sizes = config["batch_sizes"][self.device]
        self.config_hash = confighash.config_hash(config, self.device)
        for section in ("reproducibility", "overhead"):  # this device's checks
            config[section]["variants"] = config[section]["variants"][self.device]
        for variant in config["overhead"]["variants"]:
            if variant not in config["variants"] or config["overhead"]["batch_size"] not in self.batch_sizes:
                raise PlanError(f"config: overhead variant {variant!r} at batch size {config['overhead']['batch_size']} "
                                f"must also be a benchmarked variant and {self.device} batch size (it is compared "
                                "with that run)")
        self.models = {layout.slug(m): m for m in config["models"]}
        # This machine's folder first, then the folders of other machines that join this report.
        self.hardware_folders = [self.hardware] + [h for h in config["results_from"] if h != self.hardware]
        self.cells = [(m, v, bs) for m in self.models for v in [*config["variants"], layout.CONTROL_DIR]
                      for bs in self.batch_sizes]
        self.round_orders = {k: self.round_order(k) for k in range(1, self.rounds + 1)}

    @classmethod
    def of_machine(cls, config: dict, found: dict) -> "Plan":
        return cls(config, found["id"], "cuda" if found["device"] == "cuda" else "cpu")

    @property
    def results(self) -> str:
        return self.config["results"]

    # -------------------------------------------------------- job arguments (never through a shell unquoted)

    def run_args(self, model: str, batch_size, plain: bool = False) -> list[str]:
        """Arguments of `barkbench run` for one job (`model`: its folder name), as a list to quote one by one."""
        config = self.config
        args = ["--model", self.models[model], "--device", config["device"], "--batch-size", str(batch_size)]
        if config["offline_fallback"] != "none":
            args += ["--offline-fallback", config["offline_fallback"]]
        for key, value in self.protocol.items():
            if key == "do_sample":
                args += [] if value else ["--greedy"]
            else:
                args += [f"--{key.replace('_', '-')}", str(value)]
        for text in config["prompts"]:
            args += ["--prompt", text]
        args += ["--config-hash", self.config_hash]  # recorded; the aggregation refuses a record of another config
        return args + (["--no-stage-timing"] if plain else [])

    # -------------------------------------------------------- the files this config declares

    def _paths(self, pattern: str, folders, **wildcards) -> list[str]:
        return _expand(f"{self.results}/{pattern}", hardware=folders or self.hardware_folders, **wildcards)

    def run_jsons(self, folders=None) -> list[str]:
        """Every process of every cell, and of the A/A control cell (the baseline again, scheduled as its own cell)."""
        reps = range(1, self.config["replicates"] + 1)
        return (self._paths(layout.RUN, folders, model=self.models, variant=self.config["variants"],
                            bs=self.batch_sizes, k=reps)
                + self._paths(layout.CONTROL, folders, model=self.models, bs=self.batch_sizes, k=reps))

    def fidelity_variants(self) -> list[str]:
        """The variants whose fidelity is checked: all but the baseline (on either stack)."""
        config = self.config
        if not config["fidelity"]["enabled"]:
            return []
        baselines = {config["baseline"], legacy.baseline_for(legacy.PREFIX, config["baseline"])}
        return [v for v in config["variants"] if v not in baselines]

    def fidelity_args(self, model: str, variant: str) -> list[str]:
        """Arguments of `barkbench fidelity` for one check (`model`: its folder name), as a list to quote one by one."""
        config = self.config
        return (["--model", self.models[model], "--device", config["device"], "--baseline",
                 legacy.baseline_for(variant, config["baseline"]), "--tokens", str(config["fidelity"]["tokens"]),
                 "--time-limit-s", str(self.time_limit_s)]
                + ([] if config["offline_fallback"] == "none" else ["--offline-fallback", config["offline_fallback"]]))

    def not_applicable_jobs(self) -> dict[str, list[str]]:
        """This machine's cell processes and fidelity checks whose variant cannot run on its device, each with the
        `barkbench` arguments that record why: one job writes them all (`barkbench each`: one interpreter start, not
        one per record). The 2023 stack's variants record theirs in their own jobs, with that stack's interpreter."""
        config, hw, jobs = self.config, self.hardware, {}
        for m, v in itertools.product(self.models, config["variants"]):
            if legacy.is_legacy_variant(v) or self._runs_here(v):
                continue
            for bs, k in itertools.product(self.batch_sizes, range(1, self.rounds + 1)):
                path = f"{self.results}/" + layout.RUN.format(hardware=hw, model=m, variant=v, bs=bs, k=k)
                jobs[path] = ["run", "--variant", v, *self.run_args(m, bs), "--out", path]
            if v in self.fidelity_variants():
                path = f"{self.results}/" + layout.FIDELITY.format(hardware=hw, model=m, variant=v)
                jobs[path] = ["fidelity", "--variant", v, *self.fidelity_args(m, v), "--out", path]
        return jobs

    def fidelity_jsons(self, folders=None) -> list[str]:
        return self._paths(layout.FIDELITY, folders, model=self.models, variant=self.fidelity_variants())

    def faults_jsons(self, folders=None) -> list[str]:
        """The fault suite of each model, beside its fidelity checks."""
        f = self.config["fidelity"]
        return self._paths(layout.FAULTS, folders, model=self.models) if f["enabled"] and f["faults"] else []

    def repro_jsons(self, folders=None) -> list[str]:
        r = self.config["reproducibility"]
        return self._paths(layout.REPRO, folders, model=self.models, variant=r["variants"],
                           k=range(1, r["repeats"] + 1))

    def overhead_jsons(self, folders=None) -> list[str]:
        o = self.config["overhead"]
        return self._paths(layout.OVERHEAD, folders, model=self.models, variant=o["variants"], bs=o["batch_size"])

    def declared(self) -> list[str]:
        """The result files of this machine that the plan's config declares."""
        return [p for f in (self.run_jsons, self.fidelity_jsons, self.faults_jsons, self.repro_jsons,
                            self.overhead_jsons)
                for p in f([self.hardware])]

    def missing_results(self) -> list[str]:
        """Declared results whose file is not there (yet, or any more)."""
        return [p for p in self.declared() if not os.path.exists(p)]

    # -------------------------------------------------------- interleaved rounds
    # Round k measures process k of every cell, in an order drawn afresh for each round (seeded by the config's
    # schedule_seed), so a machine's slow drift spreads over all cells instead of landing on whichever runs
    # last. With one job at a time, the ready job of highest priority starts: rounds never mix, and the
    # fidelity checks run between round 1 and round 2. What the run budget cuts is thus declared: the last
    # rounds' processes first (their cells keep the processes measured before), then the fidelity checks; the
    # overhead and repro checks come after every round.

    @property
    def rounds(self) -> int:
        return self.config["replicates"]

    def round_order(self, k: int) -> dict:
        """Position of each cell in round k."""
        order = list(self.cells)
        random.Random(f"{self.config['schedule_seed']}:{k}").shuffle(order)
        return {cell: i for i, cell in enumerate(order)}

    @property
    def fidelity_priority(self) -> int:
        return self.rounds * (len(self.cells) + 2)  # after round 1, before round 2

    def round_priority(self, model: str, variant: str, bs: int, k: int) -> int:
        """Priority of process k of a cell (`variant`: the control's folder for the A/A control): round 1 above
        round 2 ..., within a round the seeded order."""
        n = len(self.cells)
        pos = self.round_orders[k].get((model, variant, bs), n)
        return (self.rounds - k + 1) * (n + 2) + (n - pos)

    # -------------------------------------------------------- time: per job and for the whole run

    @property
    def time_limit_s(self) -> float:
        return float(self.protocol["time_limit_s"])

    @property
    def runtime_min(self) -> int:
        return int(self.time_limit_s // 60) + 5  # scheduler limit: the job's own limit, plus loading Python

    @property
    def run_budget_min(self):
        return self.config["run_budget_min"][self.device]

    def _runs_here(self, variant: str) -> bool:
        opts = variants.parse(variant).optimizations
        if legacy.is_legacy_variant(variant):  # its stack is checked by its own interpreter, not this one
            return self.device == "cuda" or not any(o.needs_cuda for o in opts)
        return variants.parse(variant).not_applicable_reason(variants.torch.device(self.device)) is None

    def pending_work(self, say=to_stderr) -> list[estimate.Work]:
        """Jobs of this machine that a run would (re)make (missing, failed or unreadable result), each with what it
        is: a process of a cell (`run`), a fidelity check, the fault suite, or a record of why its variant does not
        run on this device (it loads nothing): `not_applicable`, written with the others in one job
        (`not_applicable_jobs`), or `not_applicable_job`, in a job of its own."""
        config, hw = self.config, self.hardware
        runs_here = {v: self._runs_here(v) for v in set(config["variants"] + config["reproducibility"]["variants"])}
        recorded_together = self.not_applicable_jobs()
        work = []

        def add(kind, measured, batch_size, pattern, priority=0, **wildcards):
            path = f"{self.results}/" + pattern.format(hardware=hw, **wildcards)
            if measured and not runs_here[measured]:
                kind = "not_applicable" if path in recorded_together else "not_applicable_job"
                priority = NOT_APPLICABLE_PRIORITY if path in recorded_together else priority
            # the fault suite's rule takes no retry token: its record stands once written (it records no failure)
            if not os.path.exists(path) or (pattern != layout.FAULTS and retry_args(path, say)):
                work.append(estimate.Work(kind, measured, batch_size, path, wildcards["model"], priority))

        for m in self.models:  # each with the priority its rule gives it (workflow/rules/*.smk)
            for v, bs, k in itertools.product(config["variants"], self.batch_sizes, range(1, self.rounds + 1)):
                add("run", v, bs, layout.RUN, self.round_priority(m, v, bs, k), model=m, variant=v, bs=bs, k=k)
            for bs, k in itertools.product(self.batch_sizes, range(1, self.rounds + 1)):
                add("run", config["baseline"], bs, layout.CONTROL, self.round_priority(m, layout.CONTROL_DIR, bs, k),
                    model=m, bs=bs, k=k)
            for v in self.fidelity_variants():
                add("fidelity", v, 1, layout.FIDELITY, self.fidelity_priority, model=m, variant=v)
            if self.faults_jsons([hw]):
                add("faults", "", 1, layout.FAULTS, model=m)
            r, o = config["reproducibility"], config["overhead"]
            for v, k in itertools.product(r["variants"], range(1, r["repeats"] + 1)):
                add("run", v, r["batch_size"], layout.REPRO, model=m, variant=v, k=k)
            for v in o["variants"]:
                add("run", v, o["batch_size"], layout.OVERHEAD, model=m, variant=v, bs=o["batch_size"])
        return work

    def pending_jobs(self, say=to_stderr) -> list[str]:
        """The pending jobs that load a model (their variant runs on this device)."""
        return [w.path for w in self.pending_work(say) if not w.kind.startswith("not_applicable")]

    def estimate(self, pending: list[str]) -> str | None:
        """The line that says how long a run of the `pending` jobs takes at most, before this machine is probed (a
        dry run; None: nothing to measure)."""
        if not pending:
            return None
        p = self.protocol
        bound = min(len(pending) * self.time_limit_s / 60 + estimate.REPORT_S / 60, self.run_budget_min or float("inf"))
        return (f"barkbench: {len(pending)} jobs load a model on {self.hardware} ({self.device} protocol: "
                f"{p['max_new_tokens']} tokens, warm-up {p['warmup']}, {p['min_iterations']}-"
                f"{p['max_iterations']} timed calls, {p['budget_s']:g} s of timed calls per job, "
                f"each job stopped at {self.time_limit_s:g} s); the run ends within {bound:.0f} min, tables, figures "
                "and report included (a run probes this machine first and says its estimate)")

    # -------------------------------------------------------- the probe, the estimate and the fitted budget

    def probe_command(self, python: str, model: str) -> list[str]:
        """`barkbench probe` of the baseline at the smallest batch size, with the jobs' own arguments."""
        return [python, "-m", "barkbench", "probe", "--variant", self.config["baseline"],
                *self.run_args(model, min(self.batch_sizes))]

    def fit(self, work: list[estimate.Work], probes: dict, budget_s: float | None,
            legacy_env_pending: bool = False) -> estimate.Estimate:
        """The run's estimate from each model's probe, and the timed-call budget per process that fits `budget_s`
        (the seconds left for jobs and report before the run budget ends; None: no budget)."""
        from . import faults

        cases = {m: faults.cases_in_a_workflow_run(p.cpu_features) for m, p in probes.items()}
        return estimate.estimate(work, probes, self.protocol, budget_s, cases, legacy_env_pending)


# ---------------------------------------------------------------- the run as a whole

def start_run_budget(minutes, environ=os.environ, reserve_s: float = estimate.REPORT_S,
                     started: float | None = None) -> float | None:
    """Every job inherits the deadline: the run budget less the time the tables, figures and report take after the
    last job. A job that would start after it is recorded as failed (and the next run attempts it again), so the
    whole run ends within the budget whatever the machine's speed. Returns when the budget ends (None: none)."""
    if minutes and DEADLINE_ENV not in environ:
        ends = (started or time.time()) + 60 * minutes  # from the invocation's start
        environ[DEADLINE_ENV] = str(ends - reserve_s)
        return ends
    return float(environ[DEADLINE_ENV]) + reserve_s if DEADLINE_ENV in environ else None


def begin_run(the_plan: Plan, python: str, run_started: float, budget_ends: float | None, legacy_env_pending: bool,
              say=to_stderr, environ=os.environ) -> estimate.Estimate | None:
    """Before the first job: probe this machine (each model's baseline: a job's start, a load, one call), estimate
    the pending jobs, and when they do not fit the run budget shorten the timed calls of every process
    ($BARKBENCH_TIMED_BUDGET_S, inherited by the jobs). Says the estimate in one line and keeps it beside the
    results (<results>/<hardware>/estimate.json). None (and the dry run's line stays the word) when nothing loads a
    model, or the jobs run on another machine (a `hardware` target: a scheduler's nodes)."""
    work = the_plan.pending_work(say)
    if "hardware" in the_plan.config or not any(not w.kind.startswith("not_applicable") for w in work):
        return None
    started = time.time()
    probes = {}
    for model in sorted({w.model for w in work}):
        try:
            probes[model] = estimate.run_probe(the_plan.probe_command(python, model), the_plan.time_limit_s)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            say(f"barkbench: probing this machine with {the_plan.models[model]} failed ({str(exc)[:200]}): "
                "no estimate; the run budget still holds")
            return None
    left = None if budget_ends is None else budget_ends - time.time()
    fitted = the_plan.fit(work, probes, left, legacy_env_pending)
    if fitted.shortened:
        environ[TIMED_BUDGET_ENV] = f"{fitted.timed_budget_s:g}"
    # a variant that cannot pay off on this CPU stops after a warm-up call slower than the baseline's
    environ[BASELINE_CALL_ENV] = json.dumps({the_plan.models[m]: [pr.call_s, pr.batch_size] for m, pr in probes.items()})
    ends = time.time() + fitted.seconds
    p = the_plan.protocol
    loading = sum(not w.kind.startswith("not_applicable") for w in work)
    probe_text = "; ".join(f"{the_plan.models[m]}: start {pr.startup_s:.1f} s, load {pr.load_s:.1f} s, one "
                           f"{the_plan.config['baseline']} call at bs {pr.batch_size} {pr.call_s:.1f} s"
                           for m, pr in probes.items())
    if not fitted.shortened:
        timed = f"{p['budget_s']:g} s of timed calls per process ({p['min_iterations']}-{p['max_iterations']} calls)"
    elif fitted.fits:
        timed = (f"timed calls shortened to {fitted.timed_budget_s:g} s per process (the protocol's {p['budget_s']:g} s) "
                 f"to fit the {the_plan.run_budget_min}-min budget; at least {p['min_iterations']} calls each")
    else:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(collections.Counter(
            next(w.kind for w in work if w.path == path) for path in fitted.cut).items()))
        timed = (f"{p['min_iterations']} timed calls per process, and still over the {the_plan.run_budget_min}-min "
                 f"budget: the deadline leaves out about {len(fitted.cut)} jobs, lowest priority first ({kinds}; "
                 "listed in estimate.json), each recorded as not run")
        ends = min(ends, budget_ends)
        if DEADLINE_ENV in environ:  # each job it cuts still starts, to record that it did not run: room for those
            work_at = {w.path: w for w in work}
            records_s = sum(probes[work_at[path].model].startup_s - probes[work_at[path].model].calibration_s
                            for path in fitted.cut)
            environ[DEADLINE_ENV] = str(float(environ[DEADLINE_ENV]) - records_s)
    say(f"barkbench: probe of {the_plan.hardware} ({probe_text}; {time.time() - started:.0f} s): {loading} jobs load a "
        f"model, {len(work) - loading} record why they cannot run here; {timed}; the run ends in about "
        f"{(ends - run_started) / 60:.0f} min, by {time.strftime('%H:%M', time.localtime(ends))}, tables, figures and "
        "report included")
    from .results import write_atomic

    record = {**fitted.to_dict(), "run_started": run_started, "probed_at": started, "ends_by": ends,
              "budget_ends": budget_ends}
    write_atomic(f"{the_plan.results}/{the_plan.hardware}/estimate.json",
                 (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return fitted


def take_results_lock(results: str):
    """One measuring invocation per results folder: a lock of our own, taken atomically (the workflow takes it
    when execution starts, not in a dry run). Returns the open lock file: the lock is held until it is closed
    or the process exits."""
    import fcntl

    os.makedirs(results, exist_ok=True)
    handle = open(os.path.join(results, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "pid unknown"
        handle.close()
        raise PlanError(f"another snakemake is measuring into {results}/ ({holder}): "
                        "wait for it to end, or give this one another `results` folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle
