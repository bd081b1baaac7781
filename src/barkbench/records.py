"""Typed result records: a benchmark run (also its repro and overhead repetitions), a fidelity check and the fault
suite.

Each record is validated against its JSON Schema when written and when read. A file that is not JSON,
truncated, of another schema version or of another kind gets one line naming the file and the problem.
A run's nested measures (timing, iterations, summary, memory, throughput) are small typed records read as
attributes; on disk they stay the JSON objects the schema describes, key for key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path

from . import results, stats
from .layout import RESERVED
from .validation import first_error


class ResultError(ValueError):
    """A result file that cannot be used: its path and what is wrong, in one line."""


@lru_cache(maxsize=None)
def _fidelity_schema() -> dict:
    return json.loads(resources.files("barkbench").joinpath("schemas/fidelity.schema.json").read_text())


@lru_cache(maxsize=None)
def _faults_schema() -> dict:
    return json.loads(resources.files("barkbench").joinpath("schemas/faults.schema.json").read_text())


def _check(data, schema: dict, where: str) -> None:
    if not isinstance(data, dict):
        raise ResultError(f"{where}: expected a JSON object, found {type(data).__name__}")
    expected = schema["properties"]["schema_version"]["const"]
    if data.get("schema_version") != expected:
        raise ResultError(f"{where}: schema_version {data.get('schema_version')!r}, this barkbench reads "
                          f"{expected}: re-run it (or delete it) with this version")
    error = first_error(data, schema)
    if error is not None:
        at = ".".join(str(p) for p in error.absolute_path) or "top level"
        raise ResultError(f"{where}: not a valid {schema['title'].split(':')[0]} ({at}: {error.message[:200]})")


def _read(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not text.strip():
        raise ResultError(f"{path}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultError(f"{path}: not valid JSON (truncated or corrupt? {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno})") from None


class _Omitted:
    """Default of an optional key: left out of the JSON unless given (None, when given, is written as null)."""

    def __repr__(self) -> str:
        return "OMITTED"


OMITTED = _Omitted()


@dataclass(kw_only=True)
class _Measure:
    """A nested JSON object of a record as a typed record: known keys are attributes (an optional one not
    given reads None and is left out of the JSON), unknown keys are kept in `extra`, so a file round-trips."""

    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._omitted = {f.name for f in fields(self) if getattr(self, f.name) is OMITTED}
        for name in self._omitted:
            setattr(self, name, None)

    @classmethod
    def from_dict(cls, data: dict | None):
        if data is None or isinstance(data, cls):
            return data
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**cls._typed({k: v for k, v in data.items() if k in known}),
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def _typed(cls, values: dict) -> dict:
        """The values of the nested records among `values` as their types (a subclass with some says which)."""
        return values

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name == "extra" or f.name in self._omitted:
                continue
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
        return {**out, **self.extra}


def _plain(value):
    if isinstance(value, _Measure):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(kw_only=True)
class Latency(_Measure):
    """Descriptive statistics of the timed calls' latencies in seconds (`barkbench.stats.summarize`)."""

    n: int
    mean: float | None = OMITTED  # the schema asks only n and the median
    median: float
    std: float | None = OMITTED
    min: float | None = OMITTED
    max: float | None = OMITTED
    p10: float | None = OMITTED
    p90: float | None = OMITTED
    cv: float | None = OMITTED
    ci_low: float | None = OMITTED
    ci_high: float | None = OMITTED
    ci_level: float | None = OMITTED
    ci_method: str | None = OMITTED

    @classmethod
    def from_values(cls, values) -> "Latency":
        return cls(**stats.summarize(values))


@dataclass(kw_only=True)
class Summary(_Measure):
    latency_s: Latency

    @classmethod
    def _typed(cls, values: dict) -> dict:
        return {**values, "latency_s": Latency.from_dict(values.get("latency_s"))}


@dataclass(kw_only=True)
class Stage(_Measure):
    """One generation stage over the timed calls: seconds and tokens per call; semantic and coarse, also the
    seconds and number of their decode steps per call and the cache positions those steps read
    (`trackers.DecodeSteps`; a None: no steps marked, or positions not known)."""

    seconds: list[float]
    tokens: list[int]
    decode_seconds: list[float | None] | None = OMITTED
    decode_steps: list[int] | None = OMITTED
    decode_cache_positions: list[int | None] | None = OMITTED


@dataclass(kw_only=True)
class Iterations(_Measure):
    """Per timed call: latency, seconds of audio, semantic tokens; per stage (None: stages not timed); on a CPU, the
    read bandwidth and the fine stage's GEMM throughput around the calls."""

    latency_s: list[float]
    audio_s: list[float]
    semantic_tokens: list[int]
    stages: dict[str, Stage] | None
    # CPU: the read bandwidth (bytes/s) before the first call and after each (calibration.read_bandwidth_now)
    read_bandwidth_bytes_per_s: list[float] | None = OMITTED
    # CPU: the GEMM throughput (FLOP/s) of the fine stage's number format, as the read bandwidth
    # (calibration.gemm_rate_now)
    fine_gemm_flops_per_s: list[float] | None = OMITTED

    @classmethod
    def _typed(cls, values: dict) -> dict:
        stages = values.get("stages")
        return {**values, "stages": None if stages is None else {k: Stage.from_dict(v) for k, v in stages.items()}}


@dataclass(kw_only=True)
class Timing(_Measure):
    """Where a run's time went, outside the timed calls' own latencies."""

    load_s: float
    warmup_s: list[float]
    first_call_s: float
    first_call_overhead_s: float | None  # first call minus a steady-state call
    compile_s: float | None
    compile_cache: str | None = OMITTED
    stopped_by: str
    timed_s: float
    timed_budget_s: float | None = OMITTED  # the run's, when the workflow shortened the protocol's budget_s
    job_s: float
    time_limit_s: float
    time_limit_source: str
    stage_timer_overhead_s: float | None = OMITTED


@dataclass(kw_only=True)
class Memory(_Measure):
    """Peak and after-load memory of a run, in bytes (None: not measured on this device)."""

    peak_rss_bytes: int
    peak_anon_rss_bytes: int | None = OMITTED
    rss_after_load_bytes: int
    cuda_peak_allocated_bytes: int | None
    cuda_peak_reserved_bytes: int | None
    weights_bytes: int | None


@dataclass(kw_only=True)
class Throughput(_Measure):
    samples_per_s: float
    audio_s_per_s: float
    rtf: float  # real-time factor: seconds of compute per second of audio

    @classmethod
    def of_calls(cls, batch_size: int, median_s: float, audio_s: float) -> "Throughput":
        """From the median call's seconds and the mean seconds of audio per sample: RTF counts the audio
        of all samples of the batch."""
        return cls(samples_per_s=batch_size / median_s, audio_s_per_s=batch_size * audio_s / median_s,
                   rtf=median_s / (batch_size * audio_s))


class _Record:
    SCHEMA: callable
    MEASURES: dict = {}  # field -> its typed record (a _Measure)

    @classmethod
    def from_dict(cls, data: dict, where: str = "result"):
        """From the JSON object (nested measures may already be typed records)."""
        if isinstance(data, dict):
            data = {k: _plain(v) for k, v in data.items()}
        _check(data, cls.SCHEMA(), where)
        known = {f.name for f in fields(cls)}
        typed = {k: cls.MEASURES[k].from_dict(v) if k in cls.MEASURES else v for k, v in data.items() if k in known}
        return cls(**typed, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(_read(Path(path)), str(path))

    def to_dict(self) -> dict:
        data = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        return {**data, **(self.extra or {})}

    def update(self, **values) -> None:
        """Set several fields at once, as a dict's update does (the job wrapper fills dicts and records alike)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        for name, value in values.items():
            setattr(self, name, value)

    def save_json(self, path) -> None:
        data = self.to_dict()
        _check(data, self.SCHEMA(), str(path))
        results.write_json(path, data)


@dataclass
class RunResult(_Record):
    """One benchmark run (model x variant x batch size on one device), or a repro/overhead repetition."""

    schema_version: int
    status: str
    reason: str | None
    error: dict | None
    model: dict
    variant: dict
    device: dict
    hardware: dict
    versions: dict
    git_commit: str | None
    protocol: dict
    timing: Timing | None
    iterations: Iterations | None
    summary: Summary | None
    memory: Memory | None
    throughput: Throughput | None
    audio: dict | None
    started_at: str
    finished_at: str
    config_hash: str | None = None
    instrumented: bool = True
    retry_of: str | None = None
    extra: dict | None = None

    SCHEMA = staticmethod(results.schema)
    MEASURES = {"timing": Timing, "iterations": Iterations, "summary": Summary, "memory": Memory,
                "throughput": Throughput}


@dataclass
class FidelityResult(_Record):
    """A variant against the baseline variant on the same inputs (see `barkbench.fidelity`)."""

    schema_version: int
    status: str
    reason: str | None
    variant: str
    baseline: str
    model: dict
    device: str
    hardware: dict
    versions: dict
    git_commit: str | None
    tokens_compared: int
    tolerance: dict
    teacher_forced: dict | None
    free_running: dict | None
    chain: dict | None
    codec: dict | None
    batched: dict | None
    within_tolerance: bool | None
    violations: list
    started_at: str
    finished_at: str
    error: str | None = None
    retry_of: str | None = None
    padded_batch: dict | None = None  # fidelity.padded_batch
    reference: dict | None = None  # the number formats simulated and the limit's shares (fidelity.run_fidelity)
    limits: dict | None = None  # per stage, the limits the check applied
    limits_measured: dict | None = None  # where the limits were calibrated, and where they are applied
    layers: dict | None = None  # fidelity.layer_check
    format_cost: dict | None = None  # fidelity.format_cost
    extra: dict | None = None

    SCHEMA = staticmethod(_fidelity_schema)


FAULT_BUDGET_SPENT = "run budget exhausted"  # a fault case's `not_run` when the run's deadline came before it


@dataclass
class FaultSuite(_Record):
    """The fault suite of one model on one machine (see `barkbench.faults`): per case, how far outside its limits
    a fault lies (caught) and how far inside a correct variant lies, or why the case was not run."""

    schema_version: int
    kind: str
    model: str  # as requested
    model_id: str  # as run (a synthetic twin of a hub model that could not be reached)
    weights: str | None
    device: str
    tokens: int
    inputs: str
    hardware: dict
    versions: dict
    git_commit: str | None
    started_at: str
    finished_at: str
    rows: list
    extra: dict | None = None

    SCHEMA = staticmethod(_faults_schema)


def hardware_folder(path, results_dir) -> str:
    """The hardware folder a result file lies in (the first part of its path under the results folder)."""
    try:
        rel = Path(path).resolve().relative_to(Path(results_dir).resolve())
    except ValueError:
        raise ResultError(f"{path}: not under the results folder {results_dir}") from None
    if len(rel.parts) < 3 or rel.parts[0] in RESERVED:
        raise ResultError(f"{path}: not in the results layout <hardware>/<model>/...")
    return rel.parts[0]
