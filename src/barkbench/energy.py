"""Energy counters: NVML's total-energy counter of a GPU (nvidia-ml-py, optional), RAPL package counters of
the CPUs through /sys/class/powercap where readable. None where neither exists: the result says so.

Scopes differ and are recorded: NVML counts the whole GPU board, RAPL whole CPU packages (every process on
them, and not the DRAM or GPU). Energy is read right before and right after each timed call (after its
synchronize on a GPU), so the time between calls is not counted."""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

NO_COUNTER = "no energy counter on this machine"
POWERCAP = "/sys/class/powercap"


@dataclass
class RaplCounter:
    """The package zones intel-rapl:N (sub-zones intel-rapl:N:M are parts of them: not added again)."""

    zones: list[Path]
    name: str = "rapl"
    scope: str = "CPU packages (RAPL; all processes on them)"
    max_uj: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.max_uj = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]

    def read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def joules(self, start: list[int], end: list[int]) -> float:
        # The counter wraps at max_energy_range_uj; a call is far shorter than one wrap period.
        return sum((e - s if e >= s else e + m - s) for s, e, m in zip(start, end, self.max_uj)) / 1e6


@dataclass
class NvmlCounter:
    handle: object
    name: str = "nvml"
    scope: str = "GPU board (NVML total energy)"

    def read(self) -> list[int]:
        import pynvml

        return [pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)]  # millijoules since driver load

    def joules(self, start: list[int], end: list[int]) -> float:
        return (end[0] - start[0]) / 1e3


def rapl_counter(root: str | os.PathLike = POWERCAP) -> RaplCounter | None:
    zones = sorted(Path(p) for p in glob.glob(os.path.join(root, "intel-rapl:*"))
                   if re.fullmatch(r"intel-rapl:\d+", Path(p).name))
    try:
        counter = RaplCounter(zones) if zones else None
        if counter:
            counter.read()  # unreadable without privileges on most kernels
        return counter
    except (OSError, ValueError):
        return None


def nvml_counter(device: torch.device) -> NvmlCounter | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        handle = (pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid is not None
                  else pynvml.nvmlDeviceGetHandleByIndex(device.index or 0))
        counter = NvmlCounter(handle)
        counter.read()  # NotSupported before Volta
        return counter
    except Exception:  # noqa: BLE001: not installed, no driver library, not supported: no counter
        return None


def counter_for(device: torch.device):
    """The energy counter of the device a run uses, or None."""
    return nvml_counter(device) if device.type == "cuda" else rapl_counter()


def record(counter, joules_per_call: list[float], batch_size: int, audio_s: list[float]) -> dict:
    """The result's `energy`: per call, per sample (median call / batch size) and per second of audio
    (all timed calls' energy over all the audio they produced)."""
    if counter is None:
        return {"counter": None, "reason": NO_COUNTER}
    import numpy as np

    audio_total = batch_size * float(sum(audio_s))
    return {"counter": counter.name, "scope": counter.scope, "joules_per_call": joules_per_call,
            "joules_per_sample": float(np.median(joules_per_call)) / batch_size,
            "joules_per_audio_s": float(sum(joules_per_call)) / audio_total if audio_total > 0 else None}
