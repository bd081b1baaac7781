# One self-contained HTML report: quarto when on PATH, pandoc (pypandoc-binary) otherwise. It lays out
# the tables' fragments and the figures; it computes nothing.


rule render_report:
    input:
        qmd="report/report.qmd",
        assets=["report/report.css", "report/filters/quarto-compat.lua"],
        tables=rules.aggregate.output.tables,
        fragments=rules.aggregate.output.fragments,
        figures=rules.figures.output.figures,
        figures_md=rules.figures.output.markdown,
    output:
        REPORT,
    params:
        python=JOB_PYTHON,
        tables=lambda wc, input: os.path.dirname(input.tables[0]),
        figures=lambda wc, input: os.path.dirname(input.figures_md),
    conda:
        "../../envs/barkbench.yaml"
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "{params.python:q} -m barkbench render --qmd {input.qmd:q} --tables {params.tables:q} --figures {params.figures:q}"
        " --out {output:q} 2> {log:q}"


rule effective_config:
    # The merged configuration of this run (config/config.yaml plus any --configfile), for the report.
    output:
        f"{RESULTS}/{layout.CONFIG}",
    log:
        f"{RESULTS}/logs/effective_config.log",
    params:
        text=yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
    run:
        from barkbench.results import write_atomic

        write_atomic(output[0], params.text.encode("utf-8"))
