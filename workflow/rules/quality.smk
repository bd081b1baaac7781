# Measurement rigor: fidelity against the baseline variant, reproducibility in fresh processes, and the
# stage timers' overhead (plain runs without them). All of them load a model: exclusive, like benchmarks.


rule fidelity:
    input:
        stack=stack_input,
    output:
        this_machine(layout.FIDELITY),
    params:
        args=lambda wc: PLAN.fidelity_args(wc.model, wc.variant),
        retry=retry_of(layout.FIDELITY),
        python=interpreter,
    priority: FIDELITY_PRIORITY
    threads: EXCLUSIVE
    resources:
        gpu=gpu_resources,
        mem_mb=mem_mb,
        runtime=RUNTIME_MIN,
    conda:
        "../../envs/barkbench.yaml"
    log:
        log_of(layout.FIDELITY),
    shell:
        "{params.python:q} -m barkbench fidelity --variant {wildcards.variant:q} {params.args:q} {params.retry:q}"
        " --job-shell-pid $$ --out {output:q} 2> {log:q}"


rule faults:
    output:
        this_machine(layout.FAULTS),
    params:
        model=lambda wc: MODELS[wc.model],
        args=lambda wc: ["--tokens", str(config["fidelity"]["fault_tokens"])]
        + ([] if config["offline_fallback"] == "none" else ["--offline-fallback", config["offline_fallback"]]),
        python=JOB_PYTHON,
    priority: 0  # after every round: when the run's budget runs out, its remaining cases are said, not run
    threads: EXCLUSIVE
    resources:
        mem_mb=mem_mb,
        runtime=RUNTIME_MIN,
    conda:
        "../../envs/barkbench.yaml"
    log:
        log_of(layout.FAULTS),
    shell:
        "{params.python:q} -m barkbench.faults {params.model:q} {params.args:q} --out {output:q} > {log:q} 2>&1"


use rule benchmark as reproducibility with:
    priority: 0
    output:
        json=this_machine(layout.REPRO),
    params:
        variant=variant_of,
        args=lambda wc: run_args(wc.model, config["reproducibility"]["batch_size"]),
        retry=retry_of(layout.REPRO),
        python=interpreter,
    log:
        log_of(layout.REPRO),


use rule benchmark as overhead with:
    priority: 0
    output:
        json=this_machine(layout.OVERHEAD),
    params:
        variant=variant_of,
        args=lambda wc: run_args(wc.model, wc.bs, plain=True),
        retry=retry_of(layout.OVERHEAD),
        python=interpreter,
    log:
        log_of(layout.OVERHEAD),
