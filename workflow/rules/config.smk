# The config of this run: config/config.yaml, then a preset (config/<preset>.yaml, e.g. `preset: smoke` from the
# smoke profile), then any --configfile and --config of the command line, which win. Composed here rather than
# by a profile's `configfile:`, which a --configfile on the command line would silently replace.
import sys
import time

RUN_STARTED = time.time()  # the invocation's start: the run budget and the printed estimate count from here

from barkbench import plan


def planned(decide, *args, **kwargs):
    """A decision of barkbench.plan; a config it refuses stops the workflow with its one line."""
    try:
        return decide(*args, **kwargs)
    except plan.PlanError as exc:
        raise WorkflowError(str(exc)) from None


def load_configfile(path):
    """Snakemake's `configfile:`, once the file is checked (a YAML error is named by file, line and column)."""
    planned(plan.read_config_file, path)
    workflow.configfile(path)  # the command line's config is applied on top again


load_configfile("config/config.yaml")
PRESET = config.get("preset")
if PRESET is not None:
    load_configfile(planned(plan.preset_file, PRESET))
if workflow.is_main_process:
    print(plan.config_sources(PRESET, workflow.config_settings.configfiles, workflow.config_settings.config),
          file=sys.stderr)
