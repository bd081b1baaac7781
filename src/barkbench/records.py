"""Typed result records: a benchmark run (also its repro and overhead repetitions) and a fidelity check.

Each record is validated against its JSON Schema when written and when read. A file that is not JSON,
truncated, of another schema version or of another kind gets one line naming the file and the problem.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path

from . import results
from .layout import RESERVED
from .validation import first_error


class ResultError(ValueError):
    """A result file that cannot be used: its path and what is wrong, in one line."""


@lru_cache(maxsize=None)
def _fidelity_schema() -> dict:
    return json.loads(resources.files("barkbench").joinpath("schemas/fidelity.schema.json").read_text())


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


class _Record:
    SCHEMA: callable

    @classmethod
    def from_dict(cls, data: dict, where: str = "result"):
        _check(data, cls.SCHEMA(), where)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(_read(Path(path)), str(path))

    def to_dict(self) -> dict:
        data = asdict(self)
        return {**{k: v for k, v in data.items() if k != "extra"}, **(self.extra or {})}

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
    timing: dict | None
    iterations: dict | None
    summary: dict | None
    memory: dict | None
    throughput: dict | None
    audio: dict | None
    started_at: str
    finished_at: str
    config_hash: str | None = None
    instrumented: bool = True
    retry_of: str | None = None
    extra: dict | None = None

    SCHEMA = staticmethod(results.schema)


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


def hardware_folder(path, results_dir) -> str:
    """The hardware folder a result file lies in (the first part of its path under the results folder)."""
    try:
        rel = Path(path).resolve().relative_to(Path(results_dir).resolve())
    except ValueError:
        raise ResultError(f"{path}: not under the results folder {results_dir}") from None
    if len(rel.parts) < 3 or rel.parts[0] in RESERVED:
        raise ResultError(f"{path}: not in the results layout <hardware>/<model>/...")
    return rel.parts[0]
