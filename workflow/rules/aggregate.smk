# Tables and the report's text from exactly the result files this config declares, then the figures
# from the tables (re-rendering never re-measures).


rule aggregate:
    input:
        runs=run_jsons(),
        fidelity=fidelity_jsons(),
        repro=repro_jsons(),
        overhead=overhead_jsons(),
        faults=faults_jsons(),
        config=f"{RESULTS}/{layout.CONFIG}",
        reference="report/reference/published_results.csv",
    output:
        tables=expand(f"{TABLES}/{{name}}.csv", name=layout.TABLE_NAMES + ("audio",)),
        fragments=expand(f"{TABLES}/fragments/{{name}}.md", name=layout.FRAGMENT_NAMES),
    params:
        python=JOB_PYTHON,
        results=lambda wc, input: os.path.dirname(input.config),
        baseline=config["baseline"],
        out_dir=lambda wc, output: os.path.dirname(output.tables[0]),
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/aggregate.log",
    shell:
        "{params.python:q} -m barkbench aggregate --results-dir {params.results:q} --baseline {params.baseline:q}"
        " --runs {input.runs:q} --fidelity {input.fidelity:q} --repro {input.repro:q} --overhead {input.overhead:q}"
        " --faults {input.faults:q}"
        " --config {input.config:q} --reference {input.reference:q} --out-dir {params.out_dir:q} 2> {log:q}"


rule figures:
    input:
        runs=f"{TABLES}/runs.csv",
        fidelity=f"{TABLES}/fidelity.csv",
    output:
        figures=expand(f"{FIGURES_DIR}/{{name}}.png", name=FIGURES),
        markdown=f"{FIGURES_DIR}/figures.md",
    params:
        python=JOB_PYTHON,
        out_dir=lambda wc, output: os.path.dirname(output.markdown),
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/figures.log",
    shell:
        "{params.python:q} -m barkbench figures --runs {input.runs:q} --fidelity {input.fidelity:q}"
        " --out-dir {params.out_dir:q} 2> {log:q}"
