"""Report rendering with pandoc (the fallback used when quarto is absent)."""
import json
import re
from pathlib import Path

import pytest

from barkbench.aggregate import aggregate
from barkbench.figures import FIGURES, make_figures
from barkbench.render import find_renderer, render_report
from conftest import make_run_json

QMD = Path(__file__).resolve().parents[1] / "report" / "report.qmd"


def _fidelity(results, variant, within):
    folder = results / "cpu-test-xeon" / "suno--bark-small" / "fidelity"
    folder.mkdir(parents=True, exist_ok=True)
    stats = {"positions": 96, "kl_mean": 1e-9 if within else 0.3, "kl_p99": 2e-9, "kl_max": 3e-9, "same_top1": 0.97,
             "max_dp_top": 1e-6, "max_abs": 1e-4, "max_rel": 1e-3, "margin": {"p10": 0.002, "median": 0.02}}
    path = {"prefix": 5, "length": 8, "agreement": 0.625, "error_bound": 1e-4, "decisive_share": 0.4,
            "margin": {"p10": 0.001, "median": 0.02}, "divergence_margin": 1e-5, "decisive_mismatches": 0,
            "same_context_max_abs": 1e-4, "same_context_max_rel": 1e-3}
    data = {"schema_version": 3, "status": "ok", "reason": None, "variant": variant, "baseline": "eager",
            "model": {"requested": "suno/bark-small", "id": "synthetic:bark-small", "weights": "synthetic"},
            "device": "cpu", "hardware": {"id": "cpu-test-xeon"}, "versions": {"torch": "2.0.0", "transformers": "4.40.0"},
            "git_commit": "abc1234", "tokens_compared": 8, "error": None, "started_at": "2024-01-01T00:00:00",
            "finished_at": "2024-01-01T00:01:00",
            "tolerance": {"logits_max_rel": 1e-2, "kl_mean": 1e-6, "kl_p99": 1e-5,
                          "max_dp_top": 1e-3, "min_snr_db": 20.0, "note": "test tolerance"},
            "teacher_forced": {s: stats for s in ("semantic", "coarse", "fine[2]", "fine[7]")},
            "free_running": {"semantic": path, "coarse": path},
            "chain": {"codes_agreement": 0.9, "codes_agreement_per_codebook": {"fine[2]": 0.9}, "waveform_snr_db": 12.5,
                      "fine_decisions": {"calls": 6, "judged_calls": 1, "decisive_share": 0.3, "decisive_mismatches": 0,
                                         "same_context_max_abs": 1e-4, "same_context_max_rel": 1e-3}},
            "codec": {"untouched": True, "snr_db": None},
            "batched": {"batch_size": 3, "tokens": 8, "rows": [path, path, path]},
            "within_tolerance": within, "violations": [] if within else ["fine[7] KL mean 0.3 > 1e-06"]}
    (folder / f"{variant}.json").write_text(json.dumps(data))
    return folder / f"{variant}.json"


def _render(tmp, results, runs, out, fidelity=(), repro=(), overhead=()):
    tables = aggregate(results, tmp / "tables", "eager", runs, fidelity, repro, overhead,
                       reference=QMD.parent / "reference" / "published_results.csv")
    make_figures(tables["runs"], tmp / "figures", tables["fidelity"])
    return render_report(QMD, tmp / "tables", tmp / "figures", out, renderer="pandoc")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    from conftest import make_run_json as mk

    paths = []
    for k, f in ((1, 1.0), (2, 1.03)):
        paths += [
            mk(tmp, "eager", 1, [10.0 * f] * 5, length_mode="natural", semantic_tokens=[60, 62, 64, 66, 70], process=k),
            mk(tmp, "sdpa", 1, [5.0 * f] * 5, peak_rss_mb=800.0, length_mode="natural",
               semantic_tokens=[60, 61, 64, 66, 68], process=k),
            mk(tmp, "eager", 2, [x * f for x in (12.0, 12.5, 11.8)], length_mode="natural", process=k),
            mk(tmp, "sdpa", 2, [x * f * (1.02 if k == 2 else 1) for x in (9.0, 9.4, 8.8)], length_mode="natural",
               process=k),
        ]
    paths += [
        mk(tmp, "fp16", 1, [], status="not_applicable", reason="not applicable on cpu: needs CUDA"),
        mk(tmp, "offload", 1, [], status="failed", reason="RuntimeError: boom"),
    ]
    results = tmp / "results"
    repro = [mk(tmp, "eager", 1, [10.0 + 0.1 * k, 10.1 + 0.1 * k], rep=k) for k in range(3)]
    fidelity = [_fidelity(results, "sdpa", within=False)]
    plain = mk(tmp, "eager", 1, [9.0, 9.1, 9.2, 9.0, 9.1], subdir="overhead/eager", instrumented=False)
    stale = mk(tmp, "sdpa+int8", 1, [1.0, 1.0])  # in the folder, not declared: never reported
    html = _render(tmp, results, paths, tmp / "out" / "report.html", fidelity, repro, [plain])
    assert stale.is_file()
    return html.read_text(encoding="utf-8"), paths, tmp


def test_renderer_detection(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no quarto on PATH: pandoc
    assert find_renderer() == "pandoc"
    quarto = tmp_path / "quarto"
    quarto.write_text("#!/bin/sh\n")
    quarto.chmod(0o755)
    assert find_renderer() == "quarto"


def test_report_is_self_contained(report):
    html, _, tmp = report
    assert not re.search(r'<img[^>]+src="(?!data:)', html)  # no external images
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) == len(FIGURES)
    assert not list((tmp / "out").glob(".report-build-*"))  # build folder cleaned up


def test_audio_per_ok_run(report):
    html, paths, _ = report
    ok_runs = len({Path(p).parent for p in paths if json.loads(Path(p).read_text())["status"] == "ok"})
    assert ok_runs == 4  # one sample per ok cell (its first process)
    assert html.count("<audio") == ok_runs
    assert len(re.findall(r'<audio[^>]+src="data:audio/', html)) == ok_runs


def test_tables_and_sections(report):
    html, _, _ = report
    assert "Absolute numbers" in html and "latency s, geometric mean [interval]" in html
    assert "Change vs eager" in html and "\u221250.0 %" in html
    # every interval states its level and degrees of freedom: 4 cell latencies, 2 changes, the overhead row and
    # sdpa at bs 1 again beside the study's bettertransformer
    assert len(re.findall(r"\(95 %, t \d+\.\d df\)", html)) == 4 + 2 + 1 + 1 and "5×2 vs 5×2" in html
    assert not re.search(r"\] \((?!95 %, t \d+\.\d df\))", html.split('id="fidelity-vs-the-baseline"')[0])
    assert "semantic tokens per call: 64 (natural length) vs 256" in html  # the study's protocol beside ours
    assert "sdpa+int8" not in html  # a JSON in the results folder that this run does not declare
    assert "not applicable on cpu: needs CUDA" in html and "RuntimeError: boom" in html
    assert "Optimizing Bark using" in html and "bettertransformer" in html  # 2023 comparison
    assert 'id="reproducibility"' in html and "10.05, 10.15, 10.25" in html
    assert 'id="fidelity-vs-the-baseline"' in html and "NO" in html
    assert "fine[7]" in html and "n/a (codec untouched)" in html and "bs 3 × 8 tokens" in html  # per codebook, codec, batch
    assert "<strong>0.3 (≤ 1e-06)</strong>" in html  # the measure beside its tolerance, out of bounds in bold
    assert 'id="instrumentation-overhead"' in html and "9.10" in html
    assert "under the 1 % budget" in html  # direct stage-timer cost stated
    assert "Intel Test Xeon" in html and "abc1234" in html  # provenance
    assert "Let&#39;s try generating speech" in html or "Let’s try generating speech" in html  # protocol prompts
    assert "{{&lt;" not in html and "{{<" not in html  # every include expanded


def test_synthetic_warning_and_callouts(report):
    html, _, _ = report
    warning = re.search(r'<div class="callout callout-warning">(.*?)</div>\s*</div>', html, re.S)
    assert warning, "synthetic-weights warning callout missing"
    assert "audio is noise" in warning.group(1) and "synthetic:bark-small" in warning.group(1)
    assert html.index('class="callout callout-warning"') < html.index('id="key-findings"')  # at the top
    assert 'class="callout callout-important"' in html  # failed/not-applicable list
    assert 'class="callout-title"' in html


def test_figure_references_resolved(report):
    html, _, _ = report
    assert "@fig-" not in html
    assert re.search(r'<a href="#fig-latency"[^>]*>Figure 1</a>', html)
    assert 'id="fig-latency"' in html and "Figure 1:" in html
    assert "Figure 6" in html


def test_no_synthetic_warning_with_hub_weights(tmp_path):
    paths = [make_run_json(tmp_path, "eager", 1, [1.0, 1.1], weights="hub")]
    html = _render(tmp_path, tmp_path / "results", paths, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="reproducibility"' not in html and 'id="fidelity-vs-the-baseline"' not in html  # optional sections
    assert 'id="instrumentation-overhead"' not in html and 'id="across-hardware"' not in html
    assert 'class="callout callout-warning"' not in html and "Synthetic weights" not in html


def test_two_hardware_folders_one_report(tmp_path):
    paths = [make_run_json(tmp_path, v, 1, [x * f for x in (1.0, 1.1, 0.9, 1.05, 0.95, 1.0)], hardware=hw)
             for hw, f in (("cpu-a-2t", 10.0), ("cuda-b", 1.0)) for v in ("eager", "sdpa")]
    html = _render(tmp_path, tmp_path / "results", paths, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="across-hardware"' in html and html.count("cpu-a-2t · suno/bark-small") >= 2
    assert "cuda-b · suno/bark-small" in html
