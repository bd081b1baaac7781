import os
import json
import subprocess
import sys

import yaml
from snakemake.utils import validate

from barkbench import models as bb_models
from barkbench import variants as bb_variants



# Validate before any job runs: schema first, then variant conflicts (e.g. fp16+bf16).
validate(config, "../schemas/config.schema.yaml")
for _variant in config["variants"] + config["reproducibility"]["variants"] + config["overhead"]["variants"]:
    try:
        bb_variants.parse(_variant)
    except bb_variants.VariantError as exc:
        raise WorkflowError(f"config: {exc}")
if config["baseline"] not in config["variants"]:
    raise WorkflowError(f"config: baseline {config['baseline']!r} is not among the variants")

RESULTS = "results"
REPORT = f"{RESULTS}/report.html"
PY = sys.executable  # the interpreter that runs Snakemake has barkbench installed


def _machine():
    """Hardware id and device type of the machine that runs the benchmark jobs."""
    out = subprocess.run([PY, "-m", "barkbench", "hardware", "--device", config["device"]],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise WorkflowError(out.stderr.strip() or "barkbench hardware failed")
    return json.loads(out.stdout)


MACHINE = _machine()
HARDWARE = config.get("hardware", MACHINE["id"])
ON_GPU = MACHINE["device"] == "cuda"
PROTOCOL = {**config["protocol"]["cuda" if ON_GPU else "cpu"], **config["protocol"]["sampling"]}
MODELS = {bb_models.slug(m): m for m in config["models"]}
FALLBACK = "" if config["offline_fallback"] == "none" else f"--offline-fallback {config['offline_fallback']}"


def protocol_args(batch_size):
    p = PROTOCOL
    args = [f"--batch-size {batch_size}", f"--warmup {p['warmup']}", f"--iterations {p['iterations']}",
            f"--max-new-tokens {p['max_new_tokens']}", f"--length-mode {p['length_mode']}",
            f"--fine-temperature {p['fine_temperature']}", f"--coarse-temperature {p['coarse_temperature']}",
            f"--seed {p['seed']}"]
    if not p["do_sample"]:
        args.append("--greedy")
    args += [f"--prompt {json.dumps(text)}" for text in config["prompts"]]
    return " ".join(args)


def run_jsons():
    return expand(f"{RESULTS}/{HARDWARE}/{{model}}/{{variant}}/bs{{bs}}.json",
                  model=MODELS, variant=config["variants"], bs=config["batch_sizes"])


def fidelity_jsons():
    if not config["fidelity"]["enabled"]:
        return []
    others = [v for v in config["variants"] if v != config["baseline"]]
    return expand(f"{RESULTS}/{HARDWARE}/{{model}}/fidelity/{{variant}}.json", model=MODELS, variant=others)


def repro_jsons():
    r = config["reproducibility"]
    return expand(f"{RESULTS}/{HARDWARE}/{{model}}/repro/{{variant}}/rep{{k}}.json", model=MODELS,
                  variant=r["variants"], k=range(1, r["repeats"] + 1))


def overhead_jsons():
    o = config["overhead"]
    return expand(f"{RESULTS}/{HARDWARE}/{{model}}/overhead/{{variant}}/bs{o['batch_size']}.json",
                  model=MODELS, variant=o["variants"])


def gpu_resources(wildcards):
    return 1 if ON_GPU else 0


def mem_mb(wildcards, attempt):
    return 16000 if ON_GPU else 12000


wildcard_constraints:
    model=r"[A-Za-z0-9._-]+",
    variant=r"[a-z0-9]+(\+[a-z0-9]+)*",
    bs=r"\d+",
    k=r"\d+",
