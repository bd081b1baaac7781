# pandas tables and seaborn figures from the run JSONs (re-rendering never re-measures).


rule aggregate:
    input:
        run_jsons(),
    output:
        multiext(f"{RESULTS}/tables/", "runs.csv", "absolute.csv", "absolute.md", "relative.csv", "relative.md"),
    params:
        out_dir=lambda wc, output: os.path.dirname(output[0]),
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/aggregate.log",
    shell:
        "python -m barkbench aggregate {input:q} --out-dir {params.out_dir} 2> {log:q}"


rule figures:
    input:
        runs=f"{RESULTS}/tables/runs.csv",
        fidelity=fidelity_jsons(),
    output:
        expand(f"{RESULTS}/figures/{{name}}.png", name=["latency", "memory", "throughput", "pareto", "stages", "lengths"]),
    params:
        out_dir=lambda wc, output: os.path.dirname(output[0]),
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/figures.log",
    shell:
        "python -m barkbench figures --runs-csv {input.runs:q} --fidelity {input.fidelity:q}"
        " --out-dir {params.out_dir} 2> {log:q}"
