"""barkbench: reproducible inference-optimization benchmarks for the Bark text-to-speech model."""

__version__ = "0.1.0"
