"""Whether this machine can run an optimization: its packages import and do one small operation on the device
(a broken install, e.g. a flash-attn built for another torch, counts as missing), and torch.compile finds the
C toolchain it builds its kernels and launchers with. Checked before any model is loaded."""
from __future__ import annotations

import importlib
import os
import shutil
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch


def _flash_attn(device: torch.device) -> None:
    from flash_attn import flash_attn_func

    q = torch.randn(1, 4, 2, 64, device=device, dtype=torch.float16)
    flash_attn_func(q, q, q, causal=True)


def _bitsandbytes(device: torch.device) -> None:
    import bitsandbytes.functional as bnb

    weight = torch.randn(64, 64, device=device, dtype=torch.float16)
    packed, state = bnb.quantize_4bit(weight, quant_type="nf4")
    bnb.dequantize_4bit(packed, state)


def _torchao(device: torch.device) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(32, 32, dtype=torch.bfloat16, device=device)
    quantize_(layer, Int8WeightOnlyConfig())
    layer(torch.randn(2, 32, dtype=torch.bfloat16, device=device))


def _optimum(device: torch.device) -> None:
    importlib.import_module("optimum.bettertransformer")


# One operation per package, on the device the variant would run on; a package not listed is imported only.
SMOKE: dict[str, Callable[[torch.device], None]] = {
    "flash_attn": _flash_attn, "bitsandbytes": _bitsandbytes, "torchao": _torchao, "optimum": _optimum}


@lru_cache(maxsize=None)
def package_problem(package: str, device: torch.device) -> str | None:
    """None when `package` imports and passes its smoke operation on `device`; else what went wrong."""
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name and package.split(".")[0] == exc.name.split(".")[0]:
            return "not installed"
        return f"installed but does not import ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001: a broken build raises anything (ImportError, OSError, RuntimeError)
        return f"installed but does not import ({type(exc).__name__}: {exc})"
    smoke = SMOKE.get(package)
    if smoke is None:
        return None
    try:
        smoke(device)
    except Exception as exc:  # noqa: BLE001
        return f"installed but fails a one-operation test on {device.type} ({type(exc).__name__}: {str(exc)[:200]})"
    return None


TOOLCHAIN_REASON = "torch.compile needs a C compiler and the Python headers"


def compile_toolchain_problem(device: torch.device) -> str | None:
    """What torch.compile lacks to build code here, or None: Triton (CUDA) builds its launcher with a C
    compiler ($CC, cc, gcc or clang), inductor on CPU its kernels with a C++ one ($CXX, c++, g++ or clang++);
    both include Python.h."""
    if device.type == "cuda":
        names, kind = (os.environ.get("CC"), "cc", "gcc", "clang"), "C compiler ($CC, cc, gcc, clang)"
    else:
        names, kind = (os.environ.get("CXX"), "c++", "g++", "clang++"), "C++ compiler ($CXX, c++, g++, clang++)"
    missing = []
    if not any(name and shutil.which(name) for name in names):
        missing.append(f"no {kind} on PATH")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        missing.append(f"no {headers}")
    return f"{TOOLCHAIN_REASON} ({'; '.join(missing)})" if missing else None
