# One job per model x variant x batch size, each in its own process, writing one JSON (+ WAV).
# Outputs name this machine's hardware folder literally: another machine's results are never made here.


rule legacy_env:
    input:
        LEGACY_REQUIREMENTS,
    output:
        LEGACY_ENV_RECORD,
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/legacy-env.log",
    shell:
        "{JOB_PYTHON:q} -m barkbench legacy-env --requirements {input:q} --out {output:q} 2> {log:q}"


rule benchmark:
    input:
        stack=stack_input,
    output:
        json=this_machine(layout.RUN),
    params:
        args=lambda wc: run_args(wc.model, wc.bs),
        retry=retry_of(layout.RUN),
        python=interpreter,
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
        "{params.python:q} -m barkbench run --variant {wildcards.variant:q} {params.args:q} {params.retry:q}"
        " --job-shell-pid $$ --out {output.json:q} 2> {log:q}"
