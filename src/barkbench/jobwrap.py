"""What every measuring job (`barkbench run`, `barkbench fidelity`) does around its work, written once: its time
limit (its own, or what is left before the workflow's deadline), not applicable and too late to start recorded
without loading anything, and a failure inside the work recorded in its record, never raised, so that a failure
in one variant never loses the others' results."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .models import ModelSourceError
from .protocol import BASELINE_CALL_ENV, DEADLINE_ENV
from .trackers import TimeLimitExceeded

MIN_START_S = 5.0  # less than this left before the deadline: the job does not start


def now() -> str:
    """A record's time stamp (started_at, finished_at): UTC, ISO 8601, milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def quiet_transformers() -> None:
    """transformers' warnings and progress bars off: a job's stderr shows its own progress."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def use_threads(threads: int | None = None) -> int:
    """torch's intra-op threads for a job that measures or judges: all physical cores unless `threads` says
    otherwise, whatever OMP_NUM_THREADS says (Snakemake exports the rule's threads there, 1 under --cores 1, and
    schedulers often export 1)."""
    import psutil
    import torch

    n = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def secs(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"


@dataclass
class Job:
    """The job's clock and its time limit, counted from the start of the run."""
    limit_s: float
    limit_source: str  # "protocol" or "run deadline"
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exceeded(self, where: str) -> TimeLimitExceeded:
        source = " (run deadline)" if self.limit_source == "run deadline" else ""
        return TimeLimitExceeded(f"time limit {secs(self.limit_s)} s{source} reached {where}")

    def too_late(self) -> str | None:
        """Why the job does not start (less than MIN_START_S left before the deadline), or None."""
        if self.limit_source != "run deadline" or self.limit_s >= MIN_START_S:
            return None
        deadline = datetime.fromtimestamp(float(os.environ[DEADLINE_ENV]), timezone.utc).isoformat(timespec="seconds")
        return f"run budget exhausted before this job started (deadline {deadline}, {max(self.limit_s, 0):.0f} s left)"


def probed_baseline_call(model: str) -> list | None:
    """The workflow run's probe of the baseline for this model ([seconds of one call, its batch size]); None outside
    a workflow run (a job by hand) or for a model it did not probe."""
    return json.loads(os.environ.get(BASELINE_CALL_ENV) or "{}").get(model)


def cannot_pay_off_in_this_run(variant, device, model: str) -> str | None:
    """Why a variant cannot pay off on this CPU (`Variant.pays_off_on`), in a workflow run only: there its processes
    stop after a warm-up call slower than the probe, and its fidelity check is set aside. None: measure it fully."""
    from . import provenance

    if device.type != "cpu" or not probed_baseline_call(model):
        return None
    return variant.pays_off_on(provenance.cpu_features())


def job_time_limit(limit_s: float, now: float) -> Job:
    """The job's own time limit `limit_s`, or what is left before $BARKBENCH_DEADLINE when that is sooner."""
    text = os.environ.get(DEADLINE_ENV)
    if text:
        try:
            left = float(text) - now
        except ValueError:
            raise ValueError(f"{DEADLINE_ENV} must be a Unix timestamp (got {text!r})") from None
        if left < limit_s:
            return Job(left, "run deadline")
    return Job(limit_s, "protocol")


def failure_reason(exc: BaseException) -> str:
    """A failure in one line: its type and message."""
    return f"{type(exc).__name__}: {exc}".strip()[:500]


def run_job(record, job: Job, not_applicable: str | None, work: Callable[[], None],
            failure: Callable[[BaseException], dict]) -> bool:
    """Fill `record` (a result being built, status "ok" until told otherwise: a dict or a typed record, both set
    through `update(**fields)`) the one way every job does: not applicable (`not_applicable`: its reason) or too
    late to start (`job`), else `work()` run, and a failure in it recorded as status "failed" with the fields
    `failure(exc)` gives (called while the exception is handled:
    `traceback.format_exc()` shows it). A model that cannot be resolved is the config's error, and Ctrl-C the
    user's: both are raised. Stamps `finished_at`; returns whether the work started."""
    too_late = job.too_late()
    started = not (not_applicable or too_late)
    if not_applicable:
        record.update(status="not_applicable", reason=not_applicable)
    elif too_late:
        record.update(status="failed", reason=too_late)
    else:
        try:
            work()
        except (ModelSourceError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # OOM, kernel errors, the time limit
            record.update(status="failed", **failure(exc))
    record.update(finished_at=now())
    return started


def positive_int(name: str):
    """An argparse type: an integer >= 1, refused with the option's name."""
    import argparse

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer (got {text!r})")
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1 (got {value})")
        return value
    return parse
