# One job per process of a cell (model x variant x batch size), `replicates` of them per cell, each writing one
# JSON (+ WAV); the A/A control runs the baseline as its own cell.
# Outputs name this machine's hardware folder literally: another machine's results are never made here.


rule legacy_env:
    priority: 10**6  # needed by the legacy cells of round 1
    input:
        LEGACY_REQUIREMENTS,
    output:
        LEGACY_ENV_RECORD,
    params:
        python=JOB_PYTHON,
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/legacy-env.log",
    shell:
        "{params.python:q} -m barkbench legacy-env --requirements {input:q} --out {output:q} 2> {log:q}"


rule benchmark:
    input:
        stack=stack_input,
    output:
        json=this_machine(layout.RUN),
    params:
        variant=variant_of,
        args=lambda wc: run_args(wc.model, wc.bs),
        retry=retry_of(layout.RUN),
        python=interpreter,
    priority: round_priority
    threads: EXCLUSIVE
    resources:
        gpu=gpu_resources,
        mem_mb=mem_mb,
        runtime=RUNTIME_MIN,
    conda:
        "../../envs/barkbench.yaml"
    log:
        log_of(layout.RUN),
    shell:
        "{params.python:q} -m barkbench run --variant {params.variant:q} {params.args:q} {params.retry:q}"
        " --job-shell-pid $$ --out {output.json:q} 2> {log:q}"


use rule benchmark as control with:
    output:
        json=this_machine(layout.CONTROL),
    params:
        variant=variant_of,
        args=lambda wc: run_args(wc.model, wc.bs),
        retry=retry_of(layout.CONTROL),
        python=interpreter,
    log:
        log_of(layout.CONTROL),


# The processes and fidelity checks of variants that cannot run on this device (e.g. fp16 on a CPU): one job records
# why for them all, instead of an interpreter start each (the 2023 stack's variants: in their own jobs).
NOT_APPLICABLE = PLAN.not_applicable_jobs()
if NOT_APPLICABLE:

    rule not_applicable:
        output:
            list(NOT_APPLICABLE),
        params:
            commands=json.dumps(list(NOT_APPLICABLE.values())),
            python=JOB_PYTHON,
        priority: plan.NOT_APPLICABLE_PRIORITY  # seconds: before the cells' rounds
        threads: EXCLUSIVE  # its imports would disturb a measuring job beside it
        resources:
            mem_mb=mem_mb,
            runtime=RUNTIME_MIN,
        conda:
            "../../envs/barkbench.yaml"
        log:
            f"{RESULTS}/logs/{HARDWARE}/not-applicable.log",
        shell:
            "{params.python:q} -m barkbench each {params.commands:q} --job-shell-pid $$ 2> {log:q}"

    ruleorder: not_applicable > benchmark
    ruleorder: not_applicable > fidelity
