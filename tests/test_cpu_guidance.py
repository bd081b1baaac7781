"""Guidance per instruction set: which optimizations can pay off on a CPU's features, and the report's pick."""
from __future__ import annotations

import json


from barkbench import fragments, tables, variants
from conftest import make_run_json

AVX2 = ["avx2"]
AVX512_BF16_VNNI = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
AMX = ["avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8"]


def test_bf16_pays_off_only_with_native_bf16():
    bf16 = variants.REGISTRY["bf16"]
    assert "avx512_bf16 or amx_bf16" in bf16.pays_off_on(AVX2)
    assert bf16.pays_off_on(AVX512_BF16_VNNI) is None
    assert bf16.pays_off_on(AMX) is None


def test_int8_needs_at_least_avx2():
    assert variants.REGISTRY["int8"].pays_off_on([]) is not None
    assert variants.REGISTRY["int8"].pays_off_on(AVX2) is None


def test_a_variant_cannot_pay_off_when_one_of_its_optimizations_cannot():
    assert variants.parse("sdpa+finewin").pays_off_on(AVX2) is None
    reason = variants.parse("sdpa+bf16+finewin").pays_off_on(AVX2)
    assert reason.startswith("bf16 needs")
    assert variants.parse("sdpa+bf16+finewin").pays_off_on(AMX) is None


def _guidance(tmp_path, features, fidelity_within, ceiling=None):
    paths = [make_run_json(tmp_path, v, 1, lat) for v, lat in
             (("eager", [10.0, 10.2, 9.9, 10.1]), ("sdpa+bf16", [2.0, 2.1, 2.0, 2.2]),
              ("sdpa+int8", [3.0, 3.1, 3.0, 3.2]))]
    for p in paths:  # the machine the runs were measured on
        data = json.loads(p.read_text())
        data["hardware"]["cpu_features"] = features
        if ceiling:  # barkbench.isa: an AMX machine run with AVX2 kernels
            data["hardware"].update(cpu_isa_ceiling=ceiling, cpu_features_native=AMX)
        p.write_text(json.dumps(data))
    runs = tables.cells_table(tables.runs_table(tables.read_runs(paths, tmp_path / "results"), "eager"), "eager")
    rel = tables.relative_table(runs, "eager")
    # the like-for-like verdict of each variant, as `tables.with_fidelity` gives it
    rel["fidelity"] = [("baseline" if v == "eager" else {True: "within", False: "outside"}.get(
        fidelity_within.get(v), "not checked")) for v in rel["variant"]]
    return tables.cpu_guidance_table(runs, rel)


def test_guidance_names_the_fastest_variant_within_limits(tmp_path):
    g = _guidance(tmp_path, AMX, {"sdpa+bf16": True, "sdpa+int8": True})
    assert g.iloc[0]["fastest_within_limits"] == "sdpa+bf16"
    assert g.iloc[0]["speedup"] > 4
    assert json.loads(g.iloc[0]["cannot_pay_off"]) == {}


def test_guidance_skips_variants_outside_limits_and_lists_those_that_cannot_pay_off(tmp_path):
    g = _guidance(tmp_path, AVX2, {"sdpa+bf16": False, "sdpa+int8": True})
    row = g.iloc[0]
    assert row["fastest_within_limits"] == "sdpa+int8"
    assert list(json.loads(row["cannot_pay_off"])) == ["sdpa+bf16"]
    text = fragments._guidance_md(g, "cpu-test-xeon", "suno/bark-small")
    assert "**sdpa+int8**" in text and "cannot pay off here: sdpa+bf16" in text


def test_unchecked_variants_are_not_named(tmp_path):
    g = _guidance(tmp_path, AMX, {})
    assert g.iloc[0]["fastest_within_limits"] == "eager"


def test_guidance_under_an_instruction_set_ceiling_says_so(tmp_path):
    """A capped run's guidance is for the capped features, and says the cores and memory are this machine's."""
    g = _guidance(tmp_path, AVX2, {"sdpa+bf16": True, "sdpa+int8": True}, ceiling="avx2")
    assert list(json.loads(g.iloc[0]["cannot_pay_off"])) == ["sdpa+bf16"]
    text = fragments._guidance_md(g, "cpu-test-xeon", "suno/bark-small")
    assert text.startswith("Guidance for this CPU (avx2; this machine under the avx2 instruction-set ceiling: "
                           "avx2 kernels, this machine's cores and memory):")
    plain = fragments._guidance_md(_guidance(tmp_path / "native", AMX, {}), "cpu-test-xeon", "suno/bark-small")
    assert "ceiling" not in plain
