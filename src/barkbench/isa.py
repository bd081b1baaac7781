"""An instruction-set ceiling: this machine measured as an older CPU would run the same code.

The CPU libraries PyTorch calls choose their kernels from the CPU's features, and each one lets an environment
variable cap that choice: ATen's vectorized kernels (`ATEN_CPU_CAPABILITY`), oneDNN (`ONEDNN_MAX_CPU_ISA`: fp32,
bf16 and the AMX paths), FBGEMM (`FBGEMM_ENABLE_INSTRUCTIONS`: torch.ao's int8 GEMMs) and MKL
(`MKL_ENABLE_INSTRUCTIONS`: fp32 GEMMs). Under the `avx2` ceiling an AVX-512 / AMX machine runs the kernels of an
AVX2-only CPU (no native bf16, no VNNI); under `avx512`, those of an AVX-512 CPU without VNNI, BF16 or AMX.

What a ceiling does not change: the cores, caches and memory bandwidth stay this machine's, so a capped run answers
"which variant pays off with these instructions", not "how fast is an AVX2 machine". Runtimes that read the CPU's
features themselves (ONNX Runtime's MLAS, OpenVINO) cannot be capped: their variants are not applicable under one.

The ceiling travels to every job in `BARKBENCH_CPU_ISA`; importing barkbench (before torch is) sets the libraries'
variables from it, so every entry point (`python -m barkbench ...`, `python -m barkbench.faults`) runs capped.
"""
from __future__ import annotations

import os

ENV = "BARKBENCH_CPU_ISA"
NATIVE = "native"


# Per ceiling: the libraries' variables, the CPU features it leaves (of provenance.CPU_FEATURES), and the capability
# ATen must then report (checked when the hardware is recorded: a ceiling that did not take is an error, not a label).
CEILINGS = {
    "avx2": {"env": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                     "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
             "features": ("avx2",), "aten": "AVX2"},
    "avx512": {"env": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                       "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
               "features": ("avx2", "avx512f"), "aten": "AVX512"},
}


class CeilingError(RuntimeError):
    pass


def ceiling(environ=os.environ) -> str | None:
    """The ceiling this process runs under (None: the CPU's own features)."""
    name = environ.get(ENV) or NATIVE
    if name == NATIVE:
        return None
    if name not in CEILINGS:
        raise CeilingError(f"{ENV}={name!r}: use {NATIVE} or one of {', '.join(CEILINGS)}")
    return name


def apply(environ=os.environ) -> None:
    """Set the libraries' variables of the ceiling in `environ` (before torch loads its libraries)."""
    if name := ceiling(environ):
        environ.update(CEILINGS[name]["env"])


def set_for_jobs(name: str, environ=os.environ) -> None:
    """The workflow's side: every job it starts inherits the ceiling of the config (`cpu_isa`, a name the schema
    checked; `apply` refuses any other)."""
    environ[ENV] = name
    apply(environ)


def folder_suffix(name: str | None) -> str:
    """What a ceiling adds to the hardware folder: its results are another machine's, in effect."""
    return "" if name in (None, NATIVE) else f"-{name}"


def capped_features(features: list[str], name: str | None) -> list[str]:
    """The CPU features the kernels may use under the ceiling."""
    return list(features) if name is None else [f for f in features if f in CEILINGS[name]["features"]]


def check_took(name: str | None) -> None:
    """Raise when ATen does not run at the ceiling (its variable was set after ATen chose its kernels)."""
    if name is None:
        return
    import torch

    got = torch.backends.cpu.get_cpu_capability()
    if got != CEILINGS[name]["aten"]:
        raise CeilingError(f"CPU ceiling {name}: ATen runs {got} kernels, not {CEILINGS[name]['aten']} "
                           f"(set {ENV} before Python starts)")


def uncappable_reason(runtime: str) -> str | None:
    """Why a runtime that picks its own kernels cannot run under this process's ceiling (None: no ceiling)."""
    name = ceiling()
    return None if name is None else (f"not applicable under the {name} ceiling: {runtime} reads the CPU's features "
                                      f"itself, so its kernels would not be capped")
