# One self-contained HTML report: quarto when on PATH, pandoc (pypandoc-binary) otherwise.


rule render_report:
    input:
        qmd="report/report.qmd",
        assets=["report/report.css", "report/filters/quarto-compat.lua", "report/reference/published_results.csv"],
        tables=rules.aggregate.output,
        figures=rules.figures.output,
        runs=run_jsons(),
        fidelity=fidelity_jsons(),
        repro=repro_jsons(),
        overhead=overhead_jsons(),
        config=f"{RESULTS}/config.yaml",
    output:
        REPORT,
    params:
        results_dir=lambda wc, output: os.path.dirname(output[0]),
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "python -m barkbench render --qmd {input.qmd:q} --results-dir {params.results_dir} --out {output:q}"
        " --config {input.config:q} 2> {log:q}"


rule effective_config:
    # The merged configuration of this run (config/config.yaml plus any --configfile), for the report.
    output:
        f"{RESULTS}/config.yaml",
    log:
        f"{RESULTS}/logs/effective_config.log",
    params:
        text=yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
    run:
        with open(output[0], "w", encoding="utf-8") as handle:
            handle.write(params.text)
