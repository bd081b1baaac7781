"""Where a number comes from: hardware, library versions, git commit."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import psutil
import torch

from . import isa


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {"python": platform.python_version(), **{
        p: _version(p) for p in ("torch", "transformers", "accelerate", "optimum", "barkbench",
                                 "torchao", "bitsandbytes", "flash_attn")}}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_generation() -> str | None:
    """The CPU's family and model numbers (e.g. 'family 26 model 2', a Zen 5): under a hypervisor that names the CPU
    only 'AMD EPYC', they tell apart machines whose kernels and speeds differ."""
    info = _cpuinfo()
    if "cpu family" in info and "model" in info:
        return f"family {info['cpu family']} model {info['model']}"
    return None


# Instruction-set extensions that decide which CPU variant is fastest (native bf16 / int8 matmuls).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def native_cpu_features() -> list[str]:
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in CPU_FEATURES if f in flags]


def cpu_features() -> list[str]:
    """The features the kernels may use: the CPU's, under this process's instruction-set ceiling (barkbench.isa)."""
    return isa.capped_features(native_cpu_features(), isa.ceiling())


def _slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|cpu|@.*$|processor", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40]


def hardware(device: torch.device) -> dict:
    isa.check_took(isa.ceiling() if device.type == "cpu" else None)
    info = {"cpu_model": cpu_model(), "cpu_generation": cpu_generation(),
            "cpu_cores": psutil.cpu_count(logical=False) or os.cpu_count(),
            "cpu_threads": os.cpu_count(), "cpu_features": cpu_features(), "node": platform.node(),
            "cpu_isa_ceiling": isa.ceiling(), "cpu_features_native": native_cpu_features(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # the batch job that measured, under SLURM
            "ram_bytes": psutil.virtual_memory().total,
            "torch_threads": torch.get_num_threads(), "gpu_name": None, "gpu_driver": None,
            "gpu_compute_capability": None, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_bytes=props.total_memory)
        try:
            info["gpu_driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    info["id"] = hardware_id(device)
    return info


def hardware_id(device: torch.device) -> str:
    """Folder name of a machine's results, e.g. cpu-intel-xeon-platinum-8481c-2t or cuda-nvidia-h100; a CPU under an
    instruction-set ceiling is its own folder (cpu-intel-xeon-platinum-8481c-2t-avx2)."""
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    name, info = cpu_model(), _cpuinfo()
    if not re.search(r"\d", name) and "cpu family" in info and "model" in info:  # a generic name ('AMD EPYC'): its
        name += f" f{info['cpu family']} m{info['model']}"  # family and model numbers tell the generations apart
    return f"cpu-{_slug(name)}-{os.cpu_count()}t{isa.folder_suffix(isa.ceiling())}"


def git_commit() -> str | None:
    """Commit of the barkbench checkout that runs (not of the working directory); '-dirty' if modified."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, cwd=here).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    return torch.device(name)
