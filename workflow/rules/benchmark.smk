# One job per model x variant x batch size, each in its own process, writing one JSON (+ WAV).
# Outputs name this machine's hardware folder literally: another machine's results are never made here.


rule benchmark:
    output:
        json=this_machine(layout.RUN),
    params:
        args=lambda wc: run_args(wc.model, wc.bs),
        retry=retry_of(layout.RUN),
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
        "python -m barkbench run --variant {wildcards.variant:q} {params.args:q} {params.retry:q}"
        " --out {output.json:q} 2> {log:q}"
