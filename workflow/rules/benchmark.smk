# One job per model x variant x batch size, each in its own process, writing one JSON (+ WAV).
# Jobs are placed by resources only, so executor plugins (slurm, kubernetes) can spread them.


rule benchmark:
    output:
        json=f"{RESULTS}/{HARDWARE}/{{model}}/{{variant}}/bs{{bs}}.json",
    params:
        model=lambda wc: MODELS[wc.model],
        protocol=lambda wc: protocol_args(wc.bs),
        fallback=FALLBACK,
        device=config["device"],
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/{HARDWARE}/{{model}}/{{variant}}/bs{{bs}}.log",
    resources:
        gpu=gpu_resources,
        mem_mb=mem_mb,
        runtime=60,
    shell:
        "python -m barkbench run --model {params.model} --variant {wildcards.variant:q} --device {params.device}"
        " {params.fallback} {params.protocol} --out {output.json:q}"
        " 2> {log:q}"
