"""Render report/report.qmd into one self-contained HTML file. Computes nothing: it stages the .qmd, the
Markdown fragments of `barkbench aggregate`, the figures and the audio files they name, then runs
`quarto render` when quarto is on PATH, otherwise pandoc (pypandoc-binary) with filters/quarto-compat.lua."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .aggregate import read_csv


def find_renderer() -> str:
    return "quarto" if shutil.which("quarto") else "pandoc"


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def render_report(qmd, tables_dir, figures_dir, out_html, *, renderer: str | None = None,
                  keep_build: bool = False) -> Path:
    """Stage and render. `tables_dir` holds `fragments/*.md` and `audio.csv`; `figures_dir` the PNGs and
    `figures.md`. The build happens in a temporary folder beside `out_html`, moved into place atomically."""
    qmd, tables_dir, figures_dir, out_html = Path(qmd), Path(tables_dir), Path(figures_dir), Path(out_html)
    src = qmd.parent
    renderer = renderer or find_renderer()
    out_html.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".report-build-", dir=out_html.parent))
    try:
        shutil.copyfile(qmd, build / "report.qmd")
        shutil.copyfile(src / "report.css", build / "report.css")
        shutil.copytree(src / "filters", build / "filters")
        shutil.copytree(tables_dir / "fragments", build / "_generated")
        shutil.copyfile(figures_dir / "figures.md", build / "_generated" / "figures.md")
        shutil.copytree(figures_dir, build / "figures", ignore=shutil.ignore_patterns("*.md"))
        (build / "audio").mkdir()
        for row in read_csv(tables_dir / "audio.csv").itertuples():
            shutil.copyfile(row.source, build / "audio" / row.name)
        if renderer == "quarto":
            cmd = ["quarto", "render", "report.qmd", "--to", "html", "--output", "report.html"]
        else:
            import pypandoc

            cmd = [pypandoc.get_pandoc_path(), "report.qmd", "--from", "markdown", "--to", "html5", "--standalone",
                   "--embed-resources", "--lua-filter", "filters/quarto-compat.lua", "--css", "report.css", "--toc",
                   "--columns", "1000", "--output", "report.html"]
        _run(cmd, build)
        os.replace(build / "report.html", out_html)
    finally:
        if not keep_build:
            shutil.rmtree(build, ignore_errors=True)
    return out_html

