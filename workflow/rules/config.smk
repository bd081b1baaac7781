# The config of this run: config/config.yaml, then a preset (config/<preset>.yaml, e.g. `preset: smoke` from the
# smoke profile), then any --configfile and --config of the command line, which win. Composed here rather than
# by a profile's `configfile:`, which a --configfile on the command line would silently replace.
import os
import re
import sys

import yaml


def load_configfile(path):
    """Snakemake's `configfile:`, with a YAML error named by file, line and column (Snakemake names neither)."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise WorkflowError(f"{where}: {getattr(exc, 'problem', None) or exc}") from None
    except OSError as exc:
        raise WorkflowError(f"{path}: {exc.strerror}") from None
    if not isinstance(content, dict):
        raise WorkflowError(f"{path}: must hold keys at top level (a YAML mapping), not a {type(content).__name__}")
    workflow.configfile(path)  # the command line's config is applied on top again


load_configfile("config/config.yaml")
PRESET = config.get("preset")
if PRESET is not None:
    _presets = sorted(p.removesuffix(".yaml") for p in os.listdir("config") if p != "config.yaml")
    if not (isinstance(PRESET, str) and re.fullmatch(r"[a-z0-9_-]+", PRESET) and PRESET in _presets):
        raise WorkflowError(f"config: preset: {PRESET!r} is not a file config/<preset>.yaml; presets: {', '.join(_presets)}")
    load_configfile(f"config/{PRESET}.yaml")
if workflow.is_main_process:
    _parts = ["config/config.yaml"] + ([f"config/{PRESET}.yaml (preset)"] if PRESET else [])
    _parts += [os.path.relpath(p) for p in workflow.config_settings.configfiles]
    _parts += [f"--config {k}={v}" for k, v in workflow.config_settings.config.items()]
    print(f"barkbench: config = {' + '.join(_parts)} (later ones win)", file=sys.stderr)
