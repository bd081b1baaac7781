"""The run result: a JSON document validated against `schemas/run.schema.json`, written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from . import jobs
from .protocol import Protocol

SCHEMA_VERSION = 2


@lru_cache(maxsize=None)
def schema() -> dict:
    """The run schema, its `protocol` property generated from the Protocol dataclass."""
    doc = json.loads(resources.files("barkbench").joinpath("schemas/run.schema.json").read_text())
    doc["properties"]["protocol"] = Protocol.json_schema()
    return doc


def _default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file, and a job
    whose shell is gone none (`jobs.check_shell`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        jobs.check_shell()  # an orphaned job (its shell gone) never puts a result in place
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, default=_default) + "\n").encode())
