import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import fields

import jsonschema
import yaml
from snakemake.utils import validate

from barkbench import confighash as bb_confighash
from barkbench import jobs as bb_jobs
from barkbench import layout
from barkbench import legacy as bb_legacy
from barkbench import variants as bb_variants
from barkbench.figures import FIGURES
from barkbench.protocol import DEADLINE_ENV, Protocol
from barkbench.records import FidelityResult, ResultError, RunResult


# ---------------------------------------------------------------- the config, checked before any job runs
try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as exc:  # Snakemake's message carries a dump of the schema: keep where and what
    _text = str(exc)
    _what = re.search(r"ValidationError: (.*)", _text)
    _where = re.search(r"On instance((?:\[[^\]]*\])*)", _text)
    if not _what:
        raise
    _at = ".".join(re.findall(r"\['?([^'\]]*)'?\]", _where.group(1))) if _where else ""
    raise WorkflowError(f"config: {_at or 'top level'}: {_what.group(1)[:300]}") from None
for _device, _sizes in config["batch_sizes"].items():
    if any(not isinstance(b, int) or isinstance(b, bool) for b in _sizes):  # JSON Schema takes 1.0 as integer
        raise WorkflowError(f"config: batch_sizes.{_device}: {_sizes} must be whole numbers written as such, e.g. [1, 8]")

_overflow = bb_jobs.prompts_overflow(config["prompts"])  # they reach every job on its command line
if _overflow:
    raise WorkflowError(f"config: prompts: {_overflow}")

SAMPLING = ("do_sample", "fine_temperature", "coarse_temperature", "seed")
PER_RUN = ("batch_size", "prompts")  # set by the workflow per job
_all_fields = [f.name for f in fields(Protocol)]
_checks = {"protocol.sampling": (config["protocol"]["sampling"], [f for f in _all_fields if f not in SAMPLING])}
for _device in ("cuda", "cpu"):
    _checks[f"protocol.{_device}"] = (config["protocol"][_device], [*SAMPLING, *PER_RUN])
for _where, (_block, _exclude) in _checks.items():
    # The protocol's fields and their constraints live in barkbench.protocol.Protocol, not in the config schema.
    _error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(Protocol.json_schema(exclude=_exclude)).iter_errors(_block))
    if _error is not None:
        _at = ".".join([_where, *map(str, _error.absolute_path)])
        raise WorkflowError(f"config: {_at}: {_error.message[:300]}")


def _spelled(name, where):
    """A variant in its one spelling (`bf16+sdpa` -> `sdpa+bf16`), so the results of one set of optimizations
    have one name; a renamed one is said once."""
    try:
        spelled = bb_variants.canonical(name)
    except bb_variants.VariantError as exc:
        raise WorkflowError(f"config: {where}: {exc}") from None
    if spelled != name and workflow.is_main_process:
        print(f"barkbench: config {where}: variant {name!r} is written {spelled!r}", file=sys.stderr)
    return spelled


_given = list(config["variants"])
config["variants"] = [_spelled(v, "variants") for v in _given]
for _section in ("reproducibility", "overhead"):
    config[_section]["variants"] = {d: [_spelled(v, f"{_section}.variants.{d}") for v in vs]
                                    for d, vs in config[_section]["variants"].items()}
config["baseline"] = _spelled(config["baseline"], "baseline")
for _i, _variant in enumerate(config["variants"]):
    if _variant in config["variants"][:_i]:  # e.g. sdpa+bf16 and bf16+sdpa: one variant measured twice
        _first = _given[config["variants"].index(_variant)]
        raise WorkflowError(f"config: variants {_first!r} and {_given[_i]!r} are the same optimizations; keep one")
if config["baseline"] not in config["variants"]:
    raise WorkflowError(f"config: baseline {config['baseline']!r} is not among the variants")
_legacy_baseline = bb_legacy.baseline_for(bb_legacy.PREFIX, config["baseline"])
if any(map(bb_legacy.is_legacy_variant, config["variants"])) and _legacy_baseline not in config["variants"]:
    raise WorkflowError(f"config: legacy variants are compared with {_legacy_baseline!r} (the baseline on the "
                        "2023 stack): add it to the variants")

RESULTS = config["results"]
REPORT = f"{RESULTS}/{layout.REPORT}"
TABLES = f"{RESULTS}/{layout.TABLES}"
FIGURES_DIR = f"{RESULTS}/{layout.FIGURES}"
PY = sys.executable  # the interpreter that runs Snakemake has barkbench installed
# The jobs' interpreter: this one, found without PATH (an unactivated venv works), unless Snakemake deploys a
# software environment per job (--sdm conda / apptainer), whose own `python` has barkbench installed.
_SOFTWARE_ENV = {m.name for m in workflow.deployment_settings.deployment_method} & {"CONDA", "APPTAINER"}
JOB_PYTHON = bb_jobs.job_python(bool(_SOFTWARE_ENV))


def _machine():
    """Hardware folder and device type of the benchmark jobs. A folder named in the config (`hardware`) is a
    target, e.g. a cluster partition: its device type is declared too, and each job measures the node it runs
    on (records its hardware; refuses when the node lacks the device). Otherwise this machine, detected."""
    if "hardware" in config:
        return {"id": config["hardware"], "device": "cuda" if config["device"].startswith("cuda") else "cpu"}
    out = subprocess.run([PY, "-m", "barkbench", "hardware", "--device", config["device"]],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise WorkflowError(out.stderr.strip() or "barkbench hardware failed")
    return json.loads(out.stdout)


if "hardware" in config and config["device"] == "auto":
    raise WorkflowError(f"config: hardware {config['hardware']!r} names a target: declare its device too "
                        "(device: cpu or device: cuda); the machine that submits is not measured")
MACHINE = _machine()


def _ask_hub_once():
    """Whether the hub answers is asked once per workflow, with a short timeout: when it does not, every job
    runs offline (cached checkpoint, else the synthetic twin) instead of waiting on the network itself."""
    from barkbench import models as bb_models

    wanted = [m for m in config["models"] if m in bb_models.HUB_MODELS and not bb_models.hub_cached(m)]
    if wanted and not bb_models.hub_offline() and not bb_models.hub_answers(wanted[0], timeout_s=HUB_TIMEOUT_S):
        os.environ.update(HF_HUB_OFFLINE="1")  # inherited by every job
        print(f"barkbench: the Hugging Face hub did not answer within {HUB_TIMEOUT_S:g} s: jobs run offline "
              f"({', '.join(wanted)} not cached: offline_fallback {config['offline_fallback']})", file=sys.stderr)


HUB_TIMEOUT_S = 5.0
if workflow.is_main_process:
    _ask_hub_once()
HARDWARE = MACHINE["id"]
DEVICE = "cuda" if MACHINE["device"] == "cuda" else "cpu"
PROTOCOL = {**config["protocol"][DEVICE], **config["protocol"]["sampling"]}
BATCH_SIZES = config["batch_sizes"][DEVICE]
CONFIG_HASH = bb_confighash.config_hash(config, DEVICE)
for _section in ("reproducibility", "overhead"):  # this device's checks
    config[_section]["variants"] = config[_section]["variants"][DEVICE]
for _variant in config["overhead"]["variants"]:
    if _variant not in config["variants"] or config["overhead"]["batch_size"] not in BATCH_SIZES:
        raise WorkflowError(f"config: overhead variant {_variant!r} at batch size {config['overhead']['batch_size']} "
                            f"must also be a benchmarked variant and {DEVICE} batch size (it is compared with that run)")
MODELS = {layout.slug(m): m for m in config["models"]}
# This machine's folder first, then the folders of other machines that join this report.
HARDWARE_FOLDERS = [HARDWARE] + [h for h in config["results_from"] if h != HARDWARE]


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
    """The command that runs `-m barkbench` for a variant: the 2023 stack's interpreter (on this source
    tree) for a legacy variant, the jobs' interpreter otherwise."""
    if bb_legacy.is_legacy_variant(variant_of(wc)):
        return ["env", f"PYTHONPATH={SOURCE}", str(bb_legacy.env_python(LEGACY_ENV))]
    return [JOB_PYTHON]


# ---------------------------------------------------------------- job arguments (never through a shell unquoted)

def run_args(model, batch_size, plain=False):
    """Arguments of `barkbench run` for one job, as a list: the rules quote each one with `:q`."""
    args = ["--model", MODELS[model], "--device", config["device"], "--batch-size", str(batch_size)]
    if config["offline_fallback"] != "none":
        args += ["--offline-fallback", config["offline_fallback"]]
    for key, value in PROTOCOL.items():
        if key == "do_sample":
            args += [] if value else ["--greedy"]
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    for text in config["prompts"]:
        args += ["--prompt", text]
    args += ["--config-hash", CONFIG_HASH]  # recorded; the aggregation refuses a record of another config
    return args + (["--no-stage-timing"] if plain else [])


def retry_of(pattern):
    """Params function: `--retry-of TOKEN` for a job whose result records a failure (see `retry_args`).
    Built from the wildcards, not from `output`: Snakemake ignores params derived from output files when
    it decides what to re-run."""
    return lambda wc: retry_args(this_machine(pattern).format(**wc))


def retry_args(path):
    """`--retry-of TOKEN` when the result at `path` records a failure, or is not a valid record (corrupt,
    truncated, foreign, older schema): the token differs from the params recorded when the job ran, so
    Snakemake runs it again; the new result keeps the token, and stays done."""
    if not os.path.exists(path):
        return []
    try:
        record = (FidelityResult if f"/{layout.FIDELITY_DIR}/" in path else RunResult).from_json(path)
    except ResultError as exc:
        print(f"barkbench: {exc}: it is measured again", file=sys.stderr)
        return ["--retry-of", f"invalid@{os.path.getmtime(path):.6f}"]
    token = f"failed@{record.finished_at}" if record.status == "failed" else record.retry_of
    return ["--retry-of", token] if token else []


# ---------------------------------------------------------------- the files this config declares

def _paths(pattern, hardware_folders, **wildcards):
    return expand(f"{RESULTS}/{pattern}", hardware=hardware_folders, **wildcards)


def run_jsons(folders=None, cfg=config):
    """Every process of every cell, and of the A/A control cell (the baseline again, scheduled as its own cell)."""
    reps = range(1, cfg["replicates"] + 1)
    return (_paths(layout.RUN, folders or HARDWARE_FOLDERS, model=MODELS, variant=cfg["variants"], bs=BATCH_SIZES,
                   k=reps)
            + _paths(layout.CONTROL, folders or HARDWARE_FOLDERS, model=MODELS, bs=BATCH_SIZES, k=reps))


def fidelity_jsons(folders=None, cfg=config):
    if not cfg["fidelity"]["enabled"]:
        return []
    baselines = {cfg["baseline"], bb_legacy.baseline_for(bb_legacy.PREFIX, cfg["baseline"])}
    others = [v for v in cfg["variants"] if v not in baselines]
    return _paths(layout.FIDELITY, folders or HARDWARE_FOLDERS, model=MODELS, variant=others)


def repro_jsons(folders=None, cfg=config):
    r = cfg["reproducibility"]
    return _paths(layout.REPRO, folders or HARDWARE_FOLDERS, model=MODELS, variant=r["variants"],
                  k=range(1, r["repeats"] + 1))


def overhead_jsons(folders=None, cfg=config):
    o = cfg["overhead"]
    return _paths(layout.OVERHEAD, folders or HARDWARE_FOLDERS, model=MODELS, variant=o["variants"],
                  bs=o["batch_size"])


def _declared(cfg):
    """The result files of this machine that `cfg` declares."""
    return [p for f in (run_jsons, fidelity_jsons, repro_jsons, overhead_jsons) for p in f([HARDWARE], cfg)]


_WILDCARDS = {"hardware": HARDWARE, "model": "{model}", "variant": "{variant}", "bs": "{bs}", "k": "{k}"}


def this_machine(pattern):
    """A layout pattern for the rules: this machine's hardware folder filled in, the rest left as wildcards."""
    return os.path.join(RESULTS, pattern.format(**_WILDCARDS))


def log_of(pattern):
    """The log file beside a result pattern, under <results>/logs/."""
    return os.path.join(RESULTS, "logs", pattern.format(**_WILDCARDS).removesuffix(".json") + ".log")


# ---------------------------------------------------------------- interleaved rounds
# Round k measures process k of every cell, in an order drawn afresh for each round (seeded by the config's
# schedule_seed), so a machine's slow drift spreads over all cells instead of landing on whichever runs last.
# With one job at a time (--cores), Snakemake starts the ready job of highest priority: rounds never mix,
# and the fidelity checks run between round 1 and round 2. What the run budget cuts is thus declared: the
# last rounds' processes first (their cells keep the processes measured before), then the fidelity checks;
# the overhead and repro checks come after every round.
CELLS = [(m, v, bs) for m in MODELS for v in [*config["variants"], layout.CONTROL_DIR] for bs in BATCH_SIZES]
ROUNDS = config["replicates"]
BAND = len(CELLS) + 2


def _round_order(k):
    import random

    order = list(CELLS)
    random.Random(f"{config['schedule_seed']}:{k}").shuffle(order)
    return {cell: i for i, cell in enumerate(order)}


ROUND_ORDER = {k: _round_order(k) for k in range(1, ROUNDS + 1)}
FIDELITY_PRIORITY = ROUNDS * BAND  # after round 1, before round 2


def round_priority(wc):
    """Priority of process k of a cell: round 1 above round 2 ..., within a round the seeded order."""
    k = int(wc.k)
    cell = (wc.model, wc.get("variant", layout.CONTROL_DIR), int(wc.bs))
    pos = ROUND_ORDER[k].get(cell, len(CELLS))
    return (ROUNDS - k + 1) * BAND + (len(CELLS) - pos)


# ---------------------------------------------------------------- time: per job and for the whole run

TIME_LIMIT_S = float(PROTOCOL["time_limit_s"])
RUNTIME_MIN = int(TIME_LIMIT_S // 60) + 5  # scheduler limit: the job's own limit, plus loading Python
RUN_BUDGET_MIN = config["run_budget_min"][DEVICE]


def _pending_jobs():
    """Jobs of this machine that a run would (re)make (missing, failed or unreadable result) and that load a
    model (their variant runs on this device)."""
    def runs_here_(v):  # a legacy variant's stack is checked by its own interpreter, not this one
        opts = bb_variants.parse(v).optimizations
        if bb_legacy.is_legacy_variant(v):
            return DEVICE == "cuda" or not any(o.needs_cuda for o in opts)
        return bb_variants.parse(v).not_applicable_reason(bb_variants.torch.device(DEVICE)) is None

    runs_here = [v for v in set(config["variants"] + config["reproducibility"]["variants"]) if runs_here_(v)]
    here = dict(config, variants=[v for v in config["variants"] if v in runs_here],
                reproducibility=dict(config["reproducibility"],
                                     variants=[v for v in config["reproducibility"]["variants"] if v in runs_here]),
                overhead=dict(config["overhead"], variants=[v for v in config["overhead"]["variants"] if v in runs_here]))
    return [p for p in _declared(here) if not os.path.exists(p) or retry_args(p)]


# Printed by the invocation itself (not by job subprocesses that read this file again).
_pending = _pending_jobs() if workflow.is_main_process else []
if _pending:
    _bound = min(len(_pending) * TIME_LIMIT_S / 60, RUN_BUDGET_MIN or float("inf"))
    print(f"barkbench: {len(_pending)} jobs load a model on {HARDWARE} ({DEVICE} protocol: "
          f"{PROTOCOL['max_new_tokens']} tokens, warm-up {PROTOCOL['warmup']}, {PROTOCOL['min_iterations']}-"
          f"{PROTOCOL['max_iterations']} timed calls, {PROTOCOL['budget_s']:g} s of timed calls per job, "
          f"each job stopped at {TIME_LIMIT_S:g} s); the run ends within {_bound:.0f} min, plus ~2 min for "
          "tables, figures and report", file=sys.stderr)


# A declared result whose file is gone: the report's targets (rules `all` and `report`) ask for it. Snakemake
# alone leaves such a job out when everything downstream is newer than the inputs that exist (a missing input
# reads as a deleted temporary file), and the tables would keep the result whose file is gone; asked for, it
# is measured again and the tables, figures and report are rebuilt from it.
MISSING_RESULTS = [p for p in _declared(config) if not os.path.exists(p)]
if workflow.is_main_process and os.path.isdir(TABLES):  # after a first run; a fresh one misses them all
    for _path in MISSING_RESULTS:
        print(f"barkbench: {_path} is missing: it is measured again, then the tables and report are rebuilt",
              file=sys.stderr)


def start_run_budget():
    """Every job inherits the deadline; one that would start after it is recorded as failed (and the next
    run attempts it again), so the whole run ends within the budget whatever the machine's speed."""
    if RUN_BUDGET_MIN and DEADLINE_ENV not in os.environ:
        os.environ[DEADLINE_ENV] = str(time.time() + 60 * RUN_BUDGET_MIN)


_held = []  # the open lock file, held until Snakemake exits


def take_results_lock():
    """One measuring invocation per results folder: a lock of our own, taken atomically when execution
    starts (not in a dry run). Snakemake's own lock check can race when two start at the same instant."""
    import fcntl

    os.makedirs(RESULTS, exist_ok=True)
    handle = open(os.path.join(RESULTS, ".barkbench.lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise WorkflowError(f"another snakemake is measuring into {RESULTS}/ ({handle.read().strip() or 'pid unknown'}): "
                            "wait for it to end, or give this one another `results` folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held.append(handle)


onstart:
    take_results_lock()
    start_run_budget()


# Benchmark jobs use every core: no two of them (nor a fidelity job) ever run at once on one machine. Under a
# scheduler (no --cores) the profile asks for an exclusive node per job instead, and the job uses its cores.
EXCLUSIVE = workflow.cores if workflow.resource_settings.cores is not None else 1


def gpu_resources(wildcards):
    return 1 if DEVICE == "cuda" else 0


def mem_mb(wildcards, attempt):
    return 16000 if DEVICE == "cuda" else 12000


wildcard_constraints:
    model=r"[A-Za-z0-9._-]+",
    variant=r"(?!control/)[a-z0-9]+(\+[a-z0-9]+)*",  # control/: the A/A control's folder (layout.CONTROL)
    bs=r"\d+",
    k=r"\d+",
