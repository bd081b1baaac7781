# barkbench: benchmark Bark TTS inference optimizations and render the report.
#   snakemake --cores 1 report
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/config.smk"
include: "workflow/rules/common.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/quality.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        REPORT,
        MISSING_RESULTS,


rule report:
    input:
        REPORT,
        MISSING_RESULTS,
