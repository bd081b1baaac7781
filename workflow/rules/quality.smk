# Measurement rigor: fidelity against eager fp32, reproducibility in fresh processes, and the
# stage timers' overhead (plain runs without them).


rule fidelity:
    output:
        f"{RESULTS}/{HARDWARE}/{{model}}/fidelity/{{variant}}.json",
    params:
        model=lambda wc: MODELS[wc.model],
        fallback=FALLBACK,
        device=config["device"],
        tokens=config["fidelity"]["tokens"],
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/{HARDWARE}/{{model}}/fidelity/{{variant}}.log",
    resources:
        gpu=gpu_resources,
        mem_mb=mem_mb,
        runtime=30,
    shell:
        "python -m barkbench fidelity --model {params.model} --variant {wildcards.variant:q}"
        " --device {params.device} {params.fallback} --tokens {params.tokens} --out {output:q} 2> {log:q}"


use rule benchmark as reproducibility with:
    output:
        json=f"{RESULTS}/{HARDWARE}/{{model}}/repro/{{variant}}/rep{{k}}.json",
    params:
        model=lambda wc: MODELS[wc.model],
        protocol=lambda wc: protocol_args(config["reproducibility"]["batch_size"]),
        fallback=FALLBACK,
        device=config["device"],
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/{HARDWARE}/{{model}}/repro/{{variant}}/rep{{k}}.log",


use rule benchmark as overhead with:
    output:
        json=f"{RESULTS}/{HARDWARE}/{{model}}/overhead/{{variant}}/bs{{bs}}.json",
    params:
        model=lambda wc: MODELS[wc.model],
        protocol=lambda wc: protocol_args(wc.bs) + " --no-stage-timing",
        fallback=FALLBACK,
        device=config["device"],
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/{HARDWARE}/{{model}}/overhead/{{variant}}/bs{{bs}}.log",
