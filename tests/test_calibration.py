"""The floor of each stage: bytes read per decode step, FLOPs of the fine passes, and floors from a calibration."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from barkbench import calibration, models
from conftest import TINY, load_variant

CPU = torch.device("cpu")


def _toy():
    return torch.nn.Sequential(torch.nn.Embedding(1000, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                               torch.nn.Linear(16, 4, bias=False))


def test_bytes_read_per_step_skips_embeddings_and_counts_int8_weights_as_bytes():
    toy = _toy()
    # Linear 8x16 + bias 16, LayerNorm 2x16, Linear 16x4: fp32, 4 bytes each; the 1000x8 table is not read whole
    assert calibration.bytes_read_per_step(toy) == 4 * (8 * 16 + 16 + 2 * 16 + 16 * 4)
    assert calibration.gemm_dtype(toy) == "fp32"
    assert calibration.bytes_read_per_step(toy.to(torch.bfloat16)) == 2 * (8 * 16 + 16 + 2 * 16 + 16 * 4)
    assert calibration.gemm_dtype(toy) == "bf16"
    q = torch.ao.quantization.quantize_dynamic(_toy(), {torch.nn.Linear}, dtype=torch.qint8)
    # int8 weights (1 byte), fp32 bias and LayerNorm
    assert calibration.bytes_read_per_step(q) == (8 * 16 + 16 * 4) + 4 * (16 + 2 * 16)
    assert calibration.gemm_dtype(q) == "int8"


@pytest.mark.parametrize("window", [64, 128])
def test_fine_flops_match_torch_flop_counter(tiny_checkpoint, window):
    """The analytic FLOPs of one fine pass equal what torch's FLOP counter sees in the fine model's forward."""
    model = models.load(models.resolve(TINY, None)).model
    work = calibration.stage_work(model)["fine"]
    assert work["passes_per_window"] == 6 and work["gemm_dtype"] == "fp32" and work["window_multiple"] is None
    codes = torch.randint(0, 1024, (1, window, work["codebooks"]))
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.fine_acoustics(3, codes)
    one_pass = calibration.fine_flops({**work, "max_window": window}, window, 1) / work["passes_per_window"]
    assert one_pass == counter.get_total_flops()


def test_stage_work_of_a_variant_follows_its_optimizations(tiny_checkpoint):
    def work(name):
        return calibration.stage_work(load_variant(name).model)

    eager, int8 = work("eager"), work("sdpa+int8+finewin")
    assert int8["fine"]["gemm_dtype"] == "int8" and int8["fine"]["window_multiple"] == 64
    assert eager["fine"]["window_multiple"] is None and eager["fine"]["max_window"] == 1024
    for stage in ("semantic", "coarse"):
        assert int8[stage]["bytes_per_step"] < eager[stage]["bytes_per_step"] / 2
    # the cache holds the hidden states' dtype: int8 weights leave it fp32, bf16 halves it
    bf16 = work("sdpa+bf16")
    for stage in ("semantic", "coarse"):
        assert int8[stage]["cache_bytes_per_position"] == eager[stage]["cache_bytes_per_position"]
        assert bf16[stage]["cache_bytes_per_position"] * 2 == eager[stage]["cache_bytes_per_position"]


CAL = {"read_bandwidth_bytes_per_s": 1e10, "gemm_flops_per_s": {"fp32": 1e11, "bf16": 4e11, "int8": 8e11}}
WORK = {"semantic": {"bytes_per_step": 3e8, "cache_bytes_per_position": 1e4},
        "coarse": {"bytes_per_step": 2e8, "cache_bytes_per_position": 2e4},
        "fine": {"linear_flops_per_frame": 1e8, "attention_flops_per_frame_pair": 1e4, "passes_per_window": 6,
                 "codebooks": 8, "window_multiple": None, "gemm_dtype": "fp32", "max_window": 1024}}


COUNTS = {"semantic": 32, "coarse": 96, "fine": 8 * 48}
POSITIONS = {"semantic": 32 * 300, "coarse": 96 * 700}


def test_floors_from_a_calibration():
    floors = calibration.stage_floors(WORK, CAL, COUNTS, POSITIONS, 1)
    # the weights once per step, plus the cache positions the steps attend to
    assert floors["semantic"] == pytest.approx((3e8 * 32 + 1e4 * 32 * 300) / 1e10)
    assert floors["coarse"] == pytest.approx((2e8 * 96 + 2e4 * 96 * 700) / 1e10)
    # 48 real frames still cost a full 1024-frame window per pass without the fine window
    assert floors["fine"] == pytest.approx(6 * (1e8 * 1024 + 1e4 * 1024 ** 2) / 1e11)
    windowed = {**WORK, "fine": {**WORK["fine"], "window_multiple": 64, "gemm_dtype": "int8"}}
    floors = calibration.stage_floors(windowed, CAL, COUNTS, POSITIONS, 2)
    assert floors["fine"] == pytest.approx(2 * 6 * (1e8 * 64 + 1e4 * 64 ** 2) / 8e11)


def test_floors_missing_where_they_cannot_be_given():
    assert calibration.stage_floors(None, CAL, COUNTS, POSITIONS, 1) == {"semantic": None, "coarse": None,
                                                                         "fine": None}
    assert calibration.stage_floors(WORK, None, COUNTS, POSITIONS, 1)["semantic"] is None
    # a record from before the cache positions were counted (or its work without cache bytes): no decode floor
    # rather than one of the weights alone
    assert calibration.stage_floors(WORK, CAL, COUNTS, {"semantic": float("nan")}, 1)["semantic"] is None
    old_work = {**WORK, "semantic": {"bytes_per_step": 3e8}}
    assert calibration.stage_floors(old_work, CAL, COUNTS, POSITIONS, 1)["semantic"] is None
    # beyond one window generate slides windows: no floor rather than a wrong one
    assert calibration.stage_floors(WORK, CAL, {"fine": 8 * 1500}, {}, 1)["fine"] is None
    # a number format without a calibrated GEMM (fp16 on a CPU)
    fp16 = {**WORK, "fine": {**WORK["fine"], "gemm_dtype": "fp16"}}
    assert calibration.stage_floors(fp16, CAL, {"fine": 8 * 48}, {}, 1)["fine"] is None


def test_measure_records_every_figure():
    cal = calibration.measure(budget_s=0.01)
    assert cal["read_bandwidth_bytes_per_s"] > 0 and cal["copy_bandwidth_bytes_per_s"] > 0
    # the floor's bandwidth is the faster read of the two kernels, each recorded
    assert set(cal["read_bandwidth_by_kernel"]) == {"sum", "gemv_fp32"}
    assert cal["read_bandwidth_bytes_per_s"] == max(cal["read_bandwidth_by_kernel"].values())
    assert set(cal["gemm_flops_per_s"]) == {"fp32", "bf16", "int8"}
    assert all(v > 0 for v in cal["gemm_flops_per_s"].values())
    # the fp32 GEMM's too: torch's, and MLAS's where ONNX Runtime runs (not under an instruction-set ceiling)
    from barkbench import ort_runtime

    kernels = {"torch"} | ({"onnxruntime"} if ort_runtime.unavailable_reason() is None else set())
    assert set(cal["gemm_fp32_by_kernel"]) == kernels
    assert cal["gemm_flops_per_s"]["fp32"] == max(cal["gemm_fp32_by_kernel"].values())
    assert cal["threads"] == torch.get_num_threads()


def test_stage_table_shows_floors_and_multiples(tmp_path):
    from barkbench import fragments, tables
    from conftest import make_run_json

    path = make_run_json(tmp_path, "eager", 1, [10.0, 10.0, 10.0, 10.0])
    data = json.loads(path.read_text())
    data["hardware"]["calibration"] = CAL
    data["model"]["stage_work"] = WORK
    data["model"]["decode_matmuls"] = {"semantic": {"seconds": 0.05, "matmuls": 49, "rows": 1}}
    path.write_text(json.dumps(data))
    runs = tables.runs_table(tables.read_runs([path], tmp_path / "results"), "eager")
    row = runs.iloc[0]
    # make_run_json: the semantic stage takes 40 % of each 10 s call, three quarters of it in 90 decode steps:
    # the floor is of those steps, against their time (not the prefill's)
    assert row["stage_semantic_decode_s"] == pytest.approx(3.0) and row["stage_semantic_decode_steps"] == 90
    assert row["stage_semantic_decode_cache_positions"] == 90 * 300
    assert row["stage_semantic_floor_s"] == pytest.approx((3e8 * 90 + 1e4 * 90 * 300) / 1e10)
    assert row["stage_semantic_x_floor"] == pytest.approx(3.0 / 2.727)
    assert row["stage_fine_floor_s"] > 0 and "stage_decode_floor_s" not in runs
    assert row["read_bandwidth_gb_s"] == pytest.approx(10.0)
    # the matmuls alone of the same 90 steps, against the same floor; a stage without them has none
    assert row["stage_semantic_matmuls_s"] == pytest.approx(0.05 * 90)
    assert row["stage_semantic_matmuls_x_floor"] == pytest.approx(4.5 / 2.727)
    assert row["stage_coarse_matmuls_s"] != row["stage_coarse_matmuls_s"]
    text = fragments.stages_md(runs, tables.calibration_table(runs))
    assert "semantic matmuls alone s (× floor)" in text and "4.500 (×1.7)" in text
    assert "coarse matmuls alone" not in text
    assert "semantic decode s / floor s (× floor)" in text and "(×1.1)" in text and "(×1.6)" in text
    assert "10 GB/s (10–10) between the calls, 10 GB/s (10–10) before loading" in text  # a record without probes


def test_floors_take_the_bandwidth_measured_between_the_timed_calls(tmp_path):
    """A run's read probes around its timed calls set its floors (their median), not the calibration before loading,
    and the calibration table shows both."""
    from barkbench import fragments, tables
    from conftest import make_run_json

    path = make_run_json(tmp_path, "eager", 1, [10.0, 10.0, 10.0, 10.0])
    data = json.loads(path.read_text())
    data["hardware"]["calibration"] = CAL  # 10 GB/s before loading
    data["model"]["stage_work"] = WORK
    data["iterations"]["read_bandwidth_bytes_per_s"] = [2e10, 3e10, 2e10, 1e10, 2.5e10]  # median 20 GB/s
    path.write_text(json.dumps(data))
    runs = tables.runs_table(tables.read_runs([path], tmp_path / "results"), "eager")
    row = runs.iloc[0]
    assert row["stage_semantic_floor_s"] == pytest.approx((3e8 * 90 + 1e4 * 90 * 300) / 2e10)
    assert row["read_bandwidth_gb_s"] == pytest.approx(20.0) and row["read_bandwidth_start_gb_s"] == pytest.approx(10.0)
    text = fragments.stages_md(runs, tables.calibration_table(runs))
    assert "20 GB/s (20–20) between the calls, 10 GB/s (10–10) before loading" in text


def test_the_fine_floor_takes_the_gemm_measured_between_the_timed_calls(tmp_path):
    """A run's GEMM probes of its fine format set its fine floor (their median), not the calibration before loading;
    the other formats keep the start figures, and the calibration table shows the probed format's between the calls."""
    from barkbench import fragments, tables
    from conftest import make_run_json

    path, other = (make_run_json(tmp_path, "eager", 1, [10.0, 10.0, 10.0, 10.0], process=k) for k in (1, 2))
    for p, gemm in ((path, [2e11, 4e11, 3e11]), (other, None)):  # probed: median 300 GFLOP/s; the other, none
        data = json.loads(p.read_text())
        data["hardware"]["calibration"] = CAL  # fp32 100 GFLOP/s before loading
        data["model"]["stage_work"] = WORK  # fine in fp32
        if gemm:
            data["iterations"]["fine_gemm_flops_per_s"] = gemm
        p.write_text(json.dumps(data))
    probed, start = (tables.runs_table(tables.read_runs([p], tmp_path / "results"), "eager").iloc[0]
                     for p in (path, other))
    assert probed["stage_fine_floor_s"] == pytest.approx(start["stage_fine_floor_s"] / 3)
    assert probed["gemm_fp32_between_gflop_s"] == pytest.approx(300) and probed["gemm_fp32_gflop_s"] == pytest.approx(100)
    assert start["gemm_fp32_between_gflop_s"] != start["gemm_fp32_between_gflop_s"]  # none measured
    assert probed["gemm_bf16_between_gflop_s"] != probed["gemm_bf16_between_gflop_s"]  # not the fine stage's format
    runs = tables.runs_table(tables.read_runs([path], tmp_path / "results"), "eager")
    text = fragments.stages_md(runs, tables.calibration_table(runs))
    assert "after each (the fine floors take each run's median of these; over the runs whose fine stage has it): " \
           "300 GFLOP/s (300–300) fp32." in text


def test_the_gemm_probe_runs_the_formats_kernels():
    """The probe between timed calls times the fine format's own kernels (an unknown format is refused), and a run's
    fine format is the stage work's where a kernel here has it."""
    assert calibration.gemm_rate_now("int8", reps=1) > 0
    assert calibration.gemm_rate_now("fp32", "torch", reps=1) > 0
    cal = {"gemm_fp32_by_kernel": {"torch": 2e11, "onnxruntime": 4e11}}
    assert calibration.fastest_gemm_kernel(cal, "fp32") == "onnxruntime"
    assert calibration.fastest_gemm_kernel(cal, "int8") is None and calibration.fastest_gemm_kernel(None, "fp32") is None
    with pytest.raises(ValueError, match="no GEMM kernel for 'fp16'"):
        calibration.gemm_rate_now("fp16")
    assert calibration.fine_gemm_format(WORK) == "fp32" and calibration.fine_gemm_format(None) is None
    assert calibration.fine_gemm_format({"fine": {**WORK["fine"], "gemm_dtype": "fp16"}}) is None


def test_the_read_probe_runs_the_calibrations_faster_read_kernel(monkeypatch):
    """The probe between timed calls runs the read kernel that was the faster in the calibration, and that one only."""
    cal = {"read_bandwidth_by_kernel": {"sum": 5e10, "gemv_fp32": 6e10}}
    assert calibration.fastest_read_kernel(cal) == "gemv_fp32" and calibration.fastest_read_kernel(None) is None
    ran = []
    real = calibration._read_kernels
    monkeypatch.setattr(calibration, "_read_kernels", lambda x: {
        name: (lambda name=name, read=read: (ran.append(name), read())) for name, read in real(x).items()})
    assert calibration.read_bandwidth_now("gemv_fp32", reps=2) > 0
    assert ran == ["gemv_fp32", "gemv_fp32"]
