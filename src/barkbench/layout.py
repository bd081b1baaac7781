"""The results layout: where every file of a run lives, relative to the results folder of a config.

One source of truth for the workflow's rules (which format these patterns with their wildcards) and
for the package. Each machine's measurements stay under their own hardware folder:

    <results>/<hardware>/<model>/<variant>/bs<N>/rep<K>.json   process K of a cell (+ .wav beside it)
    <results>/<hardware>/<model>/control/bs<N>/rep<K>.json     the baseline again, as its own cell (A/A control)
    <results>/<hardware>/<model>/fidelity/<variant>.json       fidelity of a variant against the baseline
    <results>/<hardware>/<model>/repro/<variant>/rep<K>.json   the same run repeated in fresh processes
    <results>/<hardware>/<model>/overhead/<variant>/bs<N>.json a plain run without stage timers
    <results>/tables/...  <results>/figures/...  <results>/report.html
"""
from __future__ import annotations

FIDELITY_DIR, REPRO_DIR, OVERHEAD_DIR, CONTROL_DIR = "fidelity", "repro", "overhead", "control"
# A cell (model x variant x batch size) is measured in several fresh processes, process K in round K.
RUN = "{hardware}/{model}/{variant}/bs{bs}/rep{k}.json"
CONTROL = "{hardware}/{model}/%s/bs{bs}/rep{k}.json" % CONTROL_DIR
FIDELITY = "{hardware}/{model}/%s/{variant}.json" % FIDELITY_DIR
REPRO = "{hardware}/{model}/%s/{variant}/rep{k}.json" % REPRO_DIR
OVERHEAD = "{hardware}/{model}/%s/{variant}/bs{bs}.json" % OVERHEAD_DIR
# The fault suite (`barkbench.faults`): plausible faults near the fidelity limits and the correct variants beside them.
FAULTS = "{hardware}/{model}/faults.json"
# Written by scripts/gpu-reference: the fidelity noise floors measured on that machine (one JSON per line),
# and the config its runs declare (the report's --configfile).
NOISE_FLOOR = "{hardware}/{model}/noise-floor.jsonl"
REFERENCE_CONFIG = "{hardware}/gpu-reference.yaml"

TABLES = "tables"
FIGURES = "figures"
REPORT = "report.html"
CONFIG = "config.yaml"

# Folder names a variant can never take (they hold the fidelity, repro, overhead and control files).
RESERVED = (FIDELITY_DIR, REPRO_DIR, OVERHEAD_DIR, CONTROL_DIR)

# Tables written by `barkbench aggregate` (CSV: data; the report's fragments are Markdown beside them).
TABLE_NAMES = ("runs", "processes", "noise", "absolute", "relative", "cross_hardware", "fidelity", "repro", "overhead", "stacks",
               "faults")
FRAGMENT_NAMES = ("warning", "findings", "unavailable", "protocol", "provenance", "tables", "cross_hardware",
                  "stages", "fidelity", "faults", "repro", "overhead", "comparison", "stacks", "audio")


def slug(model_id: str) -> str:
    """Folder-safe name of a model id (suno/bark-small -> suno--bark-small)."""
    return model_id.replace("/", "--").replace(":", "--")


def path(root: str, pattern: str, **fields) -> str:
    return f"{root}/{pattern.format(**fields)}"
