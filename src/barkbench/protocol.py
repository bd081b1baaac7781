"""The measurement protocol: one dataclass, defaults of the 2023 study."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The 2023 study's prompts (its single prompt first, then its batch examples), extended so a batch
# of 8 gets distinct prompts; cycled when the batch is larger.
DEFAULT_PROMPTS = [
    "Let's try generating speech, with Bark, a text-to-speech model",
    "Wow, batching is so great!",
    "I love Hugging Face, it's so cool.",
    "Hello, my dog is cute, and I need him in my life.",
    "The quick brown fox jumps over the lazy dog.",
    "Benchmarks are only as good as their protocol.",
    "Speech synthesis turns written words into sound.",
    "Please read this sentence aloud, clearly and slowly.",
]


@dataclass
class Protocol:
    warmup: int = 1
    iterations: int = 100
    batch_size: int = 1
    max_new_tokens: int = 256
    length_mode: str = "fixed"  # fixed: suppress semantic EOS so every call decodes max_new_tokens
    do_sample: bool = True
    fine_temperature: float = 0.4
    coarse_temperature: float = 0.8
    seed: int = 0
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))

    def __post_init__(self):
        for name in ("iterations", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 (got {self.warmup})")
        if self.length_mode not in ("fixed", "natural"):
            raise ValueError(f"length-mode must be fixed or natural (got {self.length_mode!r})")
        if not self.prompts:
            raise ValueError("at least one prompt is needed")

    def batch_prompts(self) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(self.batch_size)]

    def generate_kwargs(self) -> dict:
        kwargs = {"do_sample": self.do_sample, "fine_temperature": self.fine_temperature,
                  "coarse_temperature": self.coarse_temperature,
                  "semantic_max_new_tokens": self.max_new_tokens, "return_output_lengths": True}
        if self.length_mode == "fixed":
            kwargs["semantic_min_new_tokens"] = self.max_new_tokens
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)
