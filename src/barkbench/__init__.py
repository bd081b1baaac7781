"""barkbench: reproducible inference-optimization benchmarks for the Bark text-to-speech model."""

from . import isa as _isa

__version__ = "0.1.0"

# Before any submodule imports torch: the CPU libraries read their instruction-set caps when they load.
_isa.apply()
