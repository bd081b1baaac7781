"""The 2023 study's stack: transformers 4.x with optimum's BetterTransformer.

The legacy rows run this package from source with the interpreter of a virtual environment built from
`envs/legacy-requirements.txt` (transformers 4.45, optimum 1.23). Everything that differs between that
stack and today's lives here, so the run path stays one: the `legacy` optimization only says which stack
a run needs, `bt` is optimum's conversion as the study applied it, and two calls are spelled the 4.x way.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import sys
import time
import venv
from pathlib import Path

from .cache import build_dir, cache_dir

LEGACY_MAJOR = 4  # transformers major version of the 2023 stack
PREFIX = "legacy+"  # variants run on the 2023 stack are named legacy+<optimizations>
COMPLETE = ".barkbench-complete"  # written last: the environment is whole


def transformers_major() -> int:
    return int(importlib.metadata.version("transformers").split(".")[0])


def is_legacy_stack() -> bool:
    return transformers_major() <= LEGACY_MAJOR


def stack_reason() -> str | None:
    """Why a `legacy` run cannot run in this interpreter (None: it can)."""
    if is_legacy_stack():
        return None
    return (f"not applicable here: legacy runs on the 2023 stack (transformers {LEGACY_MAJOR}.x + optimum, "
            f"envs/legacy-requirements.txt), this interpreter has transformers "
            f"{importlib.metadata.version('transformers')}")


def is_legacy_variant(variant: str) -> bool:
    return variant.startswith(PREFIX)


def stack_baseline(baseline: str) -> str:
    """The baseline on the 2023 stack (legacy+eager for eager)."""
    return PREFIX + baseline


def baseline_for(variant: str, baseline: str) -> str:
    """A legacy variant is compared with the baseline on its own stack (legacy+eager for eager): the
    fidelity check loads both models in one process, so both must run in the same interpreter."""
    return stack_baseline(baseline) if is_legacy_variant(variant) else baseline


# A 2023 optimization -> what replaces it on today's stack (BetterTransformer's Bark attention is SDPA).
SUCCESSOR = {"bt": "sdpa"}


def today_counterpart(optimizations: frozenset) -> frozenset:
    """The optimizations of a legacy variant on today's stack (legacy dropped, each 2023 optimization replaced by
    its successor)."""
    return frozenset(SUCCESSOR.get(o, o) for o in optimizations if o != "legacy")


def from_pretrained_kwargs(kwargs: dict) -> dict:
    """transformers 4.x names the load dtype `torch_dtype` (5.x: `dtype`; 4.x passes `dtype` on to the
    config and loads fp32 without a word)."""
    if is_legacy_stack() and "dtype" in kwargs:
        kwargs = dict(kwargs)
        kwargs["torch_dtype"] = kwargs.pop("dtype")
    return kwargs


def enable_cpu_offload(model, index: int) -> None:
    """BarkModel.enable_cpu_offload: `gpu_id` in transformers 4.x, `accelerator_id` in 5.x."""
    if is_legacy_stack():
        model.enable_cpu_offload(gpu_id=index)
    else:
        model.enable_cpu_offload(accelerator_id=index)


def to_bettertransformer(model) -> int:
    """Convert `model` in place with optimum's BetterTransformer, as the 2023 study did
    (`BetterTransformer.transform(model, keep_original_model=False)`); returns the layers converted.
    optimum's Bark layer calls SDPA with `attn_mask=None`: it ignores the attention mask."""
    from optimum.bettertransformer import BetterTransformer
    from optimum.bettertransformer.models.decoder_models import BarkAttentionLayerBetterTransformer

    converted = BetterTransformer.transform(model, keep_original_model=False)
    if converted is not model:  # the registry applies optimizations in place
        raise RuntimeError("BetterTransformer.transform returned a copy, not the model converted in place")
    layers = sum(isinstance(m, BarkAttentionLayerBetterTransformer) for m in model.modules())
    if not layers:
        raise RuntimeError("BetterTransformer converted no Bark attention layer")
    return layers


# ---------------------------------------------------------------- the legacy environment

def pins(requirements: str | Path) -> list[str]:
    """The requirement lines of a pins file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(requirements).read_text().splitlines())
    return [line for line in lines if line]


def pins_hash(requirements: str | Path) -> str:
    """What the environment is built from: the pins and the base interpreter's Python version."""
    text = "\n".join(pins(requirements) + [f"python {sys.version_info.major}.{sys.version_info.minor}"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def env_dir(requirements: str | Path, root: str | Path | None = None) -> Path:
    return Path(root or cache_dir()) / "envs" / f"legacy-{pins_hash(requirements)}"


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def build_env(requirements: str | Path, root: str | Path | None = None) -> dict:
    """Build (once) the virtual environment of `requirements` and describe it. Built in a temporary folder
    beside the target and renamed into place when pip succeeded, so a half-built environment is never
    used; a finished one is reused (runs use `python -m`, so the renamed venv needs no fixing up)."""
    target = env_dir(requirements, root)
    started = time.perf_counter()

    def build(staged: Path) -> None:
        venv.create(staged, with_pip=True, clear=True)
        subprocess.run([str(env_python(staged)), "-m", "pip", "install", "--disable-pip-version-check",
                        "--no-input", "-r", str(Path(requirements).resolve())], check=True, stdout=sys.stderr)
        (staged / COMPLETE).write_text("\n".join(pins(requirements)) + "\n")

    built = build_dir(target, build, COMPLETE)
    freeze = subprocess.run([str(env_python(target)), "-m", "pip", "freeze", "--all"], check=True,
                            capture_output=True, text=True).stdout.split()
    return {"env": str(target), "python": str(env_python(target)), "pins_hash": pins_hash(requirements),
            "pins": pins(requirements), "built_now": built, "seconds": time.perf_counter() - started,
            "installed": freeze}
