# The rules' constants, input functions and params, from the decisions of barkbench.plan.
import json
import os

import yaml

from barkbench import jobs as bb_jobs
from barkbench import layout
from barkbench import legacy as bb_legacy
from barkbench.figures import FIGURES


_say = plan.to_stderr if workflow.is_main_process else (lambda line: None)  # jobs read this file again: say once

# ---------------------------------------------------------------- the config, checked before any job runs
planned(plan.validate, config, os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"))
planned(plan.spell_variants, config, say=_say)
MACHINE = planned(plan.machine, config)
if workflow.is_main_process:
    plan.ask_hub_once(config)
PLAN = planned(plan.Plan.of_machine, config, MACHINE)
HARDWARE, DEVICE, MODELS = PLAN.hardware, PLAN.device, PLAN.models
RESULTS = config["results"]
REPORT = f"{RESULTS}/{layout.REPORT}"
TABLES = f"{RESULTS}/{layout.TABLES}"
FIGURES_DIR = f"{RESULTS}/{layout.FIGURES}"
# The jobs' interpreter: this one, found without PATH (an unactivated venv works), unless Snakemake deploys a
# software environment per job (--sdm conda / apptainer), whose own `python` has barkbench installed.
_SOFTWARE_ENV = {m.name for m in workflow.deployment_settings.deployment_method} & {"CONDA", "APPTAINER"}
JOB_PYTHON = bb_jobs.job_python(bool(_SOFTWARE_ENV))

# ---------------------------------------------------------------- the 2023 stack (legacy+ variants)
# Built once per pins hash into the barkbench cache ($BARKBENCH_CACHE); its record lies under the results.
LEGACY_REQUIREMENTS = "envs/legacy-requirements.txt"
LEGACY_ENV = bb_legacy.env_dir(LEGACY_REQUIREMENTS)
LEGACY_ENV_RECORD = f"{RESULTS}/envs/{LEGACY_ENV.name}.json"
SOURCE = os.path.join(os.path.abspath(workflow.basedir), "src")  # the legacy interpreter runs the package from here


def variant_of(wc):
    """The variant a job measures: its `variant` wildcard, or the baseline for an A/A control job."""
    return wc.get("variant", config["baseline"])


def stack_input(wc):
    """Input function: a legacy variant needs the 2023 stack's environment."""
    return [LEGACY_ENV_RECORD] if bb_legacy.is_legacy_variant(variant_of(wc)) else []


def interpreter(wc):
    """The command that runs `-m barkbench`: the 2023 stack's (on this source tree) for a legacy variant."""
    if bb_legacy.is_legacy_variant(variant_of(wc)):
        return ["env", f"PYTHONPATH={SOURCE}", str(bb_legacy.env_python(LEGACY_ENV))]
    return [JOB_PYTHON]


# ---------------------------------------------------------------- job arguments, result files, logs
run_args = PLAN.run_args  # a list: the rules quote each argument with `:q`
run_jsons, fidelity_jsons = PLAN.run_jsons, PLAN.fidelity_jsons  # the result files this config declares
repro_jsons, overhead_jsons, faults_jsons = PLAN.repro_jsons, PLAN.overhead_jsons, PLAN.faults_jsons
_WILDCARDS = {"hardware": HARDWARE, "model": "{model}", "variant": "{variant}", "bs": "{bs}", "k": "{k}"}


def this_machine(pattern):
    """A layout pattern for the rules: this machine's hardware folder filled in, the rest left as wildcards."""
    return os.path.join(RESULTS, pattern.format(**_WILDCARDS))


def log_of(pattern):
    """The log file beside a result pattern, under <results>/logs/."""
    return os.path.join(RESULTS, "logs", pattern.format(**_WILDCARDS).removesuffix(".json") + ".log")


def retry_of(pattern):
    """Params function: `--retry-of TOKEN` when the job's result records a failure (`plan.retry_args`); from the
    wildcards, not `output`: Snakemake ignores params derived from output files when it decides what to re-run."""
    return lambda wc: plan.retry_args(this_machine(pattern).format(**wc))


# ---------------------------------------------------------------- interleaved rounds (see Plan.round_priority)
FIDELITY_PRIORITY = PLAN.fidelity_priority  # after round 1, before round 2


def round_priority(wc):
    return PLAN.round_priority(wc.model, wc.get("variant", layout.CONTROL_DIR), int(wc.bs), int(wc.k))


# ---------------------------------------------------------------- time: per job and for the whole run
TIME_LIMIT_S = PLAN.time_limit_s
RUNTIME_MIN = PLAN.runtime_min  # scheduler limit: the job's own limit, plus loading Python
if workflow.is_main_process and (_estimate := PLAN.estimate(PLAN.pending_jobs())):
    _say(_estimate)

# A declared result whose file is gone: the report's targets (rules `all` and `report`) ask for it. Snakemake
# alone leaves such a job out when everything downstream is newer than the inputs that exist (a missing input
# reads as a deleted temporary file), and the tables would keep the result whose file is gone; asked for, it
# is measured again and the tables, figures and report are rebuilt from it.
MISSING_RESULTS = PLAN.missing_results()
if os.path.isdir(TABLES):  # after a first run; a fresh one misses them all
    for _path in MISSING_RESULTS:
        _say(f"barkbench: {_path} is missing: it is measured again, then the tables and report are rebuilt")

_held = []  # the open lock file, held until Snakemake exits
onstart:
    # One measuring invocation per results folder, taken when execution starts (not in a dry run): Snakemake's
    # own lock check can race when two start at the same instant.
    _held.append(planned(plan.take_results_lock, RESULTS))
    _budget_ends = plan.start_run_budget(PLAN.run_budget_min, started=RUN_STARTED)
    # A whole run (the report, or the default target): this machine probed, the pending jobs estimated, their timed
    # calls shortened to fit the budget when needed. A run of chosen result files is not estimated.
    if not workflow.dag_settings.targets or set(workflow.dag_settings.targets) & {"all", "report"}:
        _legacy_pending = any(map(bb_legacy.is_legacy_variant, config["variants"])) and not LEGACY_ENV.exists()
        plan.begin_run(PLAN, JOB_PYTHON, RUN_STARTED, _budget_ends, _legacy_pending)


# Benchmark jobs use every core: no two of them (nor a fidelity job) ever run at once on one machine. Under a
# scheduler (no --cores) the profile asks for an exclusive node per job instead, and the job uses its cores.
EXCLUSIVE = workflow.cores if workflow.resource_settings.cores is not None else 1
gpu_resources = lambda wildcards: 1 if DEVICE == "cuda" else 0
mem_mb = lambda wildcards, attempt: 16000 if DEVICE == "cuda" else 12000


wildcard_constraints:
    model=r"[A-Za-z0-9._-]+",
    variant=r"(?!control/)[a-z0-9]+(\+[a-z0-9]+)*",  # control/: the A/A control's folder (layout.CONTROL)
    bs=r"\d+",
    k=r"\d+",
