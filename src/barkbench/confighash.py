"""The hash that ties a measurement to the config it was measured with.

Only the part of the composed config that decides what one job measures enters it: the device's protocol
(with sampling), the prompts and the offline fallback. Adding a variant, a model, a batch size or a replicate
changes which jobs exist, not what an existing job measured, so it leaves the hash (and those results) alone.
"""
from __future__ import annotations

import hashlib
import json

SCIENCE_KEYS = ("prompts", "offline_fallback")


def config_hash(config: dict, device: str) -> str:
    """sha256 (16 hex digits) of the science of one job on `device` ("cpu" or "cuda") under `config`."""
    science = {k: config.get(k) for k in SCIENCE_KEYS}
    science["protocol"] = {**config["protocol"][device], **config["protocol"]["sampling"]}
    return hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()[:16]
