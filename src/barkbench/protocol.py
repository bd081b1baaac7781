"""The measurement protocol: one dataclass, defaults of the 2023 study.

The dataclass is the single source of truth for the protocol fields: each field's metadata holds its
help text and its JSON-schema constraints, from which come the JSON schema (`Protocol.json_schema`, by which
`__post_init__` validates with jsonschema, injected into the run schema and the workflow config schema) and the
command-line options (`cli.add_protocol_args`).

Timed calls: at least `min_iterations`, at most `max_iterations`; after `min_iterations`, no new call
starts once the timed calls took `budget_s` in all (as MLPerf's minimum duration and query count).
`time_limit_s` caps the whole job (load, warm-up/compilation, timed calls).
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from .validation import errors as errors_of

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

# Environment variable holding the workflow's deadline for all its jobs (a Unix timestamp): a run's time
# limit is the protocol's, or what is left before the deadline when that is sooner.
DEADLINE_ENV = "BARKBENCH_DEADLINE"
# Environment variable holding the run's timed-call budget per process when the workflow shortened it to fit its
# run budget (`barkbench.estimate`): a job's timed calls stop at the sooner of `budget_s` and this.
TIMED_BUDGET_ENV = "BARKBENCH_TIMED_BUDGET_S"
# Environment variable holding the run's probe of the baseline (JSON: model as requested -> [seconds of one call,
# its batch size]): a variant that cannot pay off on this CPU and whose warm-up call is slower than that stops there.
BASELINE_CALL_ENV = "BARKBENCH_BASELINE_CALL_S"

# Bark's semantic model generates at most 768 tokens per call (its generation config's max_new_tokens).
MAX_SEMANTIC_TOKENS = 768


def _field(default, help: str, flag: str | None = None, **schema):
    """A protocol field: `help` for the CLI and the schema, `schema` its JSON-schema constraints,
    `flag` a CLI option name other than --<field-name>."""
    meta = {"help": help, "schema": schema, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Protocol:
    warmup: int = _field(2, "untimed calls before the timed ones; the first one's excess over the median "
                            "timed call is reported as first-call overhead (compilation for compile)",
                         type="integer", minimum=1)
    min_iterations: int = _field(2, "timed calls always made", type="integer", minimum=1)
    max_iterations: int = _field(100, "timed calls at most", type="integer", minimum=1)
    budget_s: float = _field(600.0, "after min-iterations, no new timed call starts once the timed calls "
                                    "took this many seconds in all", type="number", minimum=0)
    time_limit_s: float = _field(3600.0, "hard cap in seconds on the whole job (load, warm-up/compilation, "
                                         "timed calls)", type="number", exclusiveMinimum=0)
    batch_size: int = _field(1, "prompts per generate call", type="integer", minimum=1)
    max_new_tokens: int = _field(256, "semantic tokens per call", type="integer", minimum=1,
                                 maximum=MAX_SEMANTIC_TOKENS)
    length_mode: str = _field("fixed", "fixed: suppress the semantic EOS so every call decodes max-new-tokens; "
                                       "natural: the model's own stopping", type="string", enum=["fixed", "natural"])
    do_sample: bool = _field(True, "sample, as in 2023 (--greedy, do_sample false: greedy decoding)", flag="--greedy",
                             type="boolean")
    fine_temperature: float = _field(0.4, "fine model sampling temperature", type="number", exclusiveMinimum=0)
    coarse_temperature: float = _field(0.8, "coarse model sampling temperature", type="number", exclusiveMinimum=0)
    seed: int = _field(0, "set before every call", type="integer", minimum=0)
    prompts: list[str] = _field(DEFAULT_PROMPTS, "a batch cycles through them (default: the 2023 study's prompts)",
                                flag="--prompt", type="array", items={"type": "string"}, minItems=1)

    def __post_init__(self):
        problem = _first_problem(self.to_dict(), self.json_schema())
        if problem:
            raise ValueError(problem)
        if self.max_iterations < self.min_iterations:
            raise ValueError(f"max-iterations must be >= min-iterations (got {self.max_iterations} < "
                             f"{self.min_iterations})")

    @classmethod
    def json_schema(cls, exclude=()) -> dict:
        """JSON Schema of the protocol object (all fields but `exclude`, each required, nothing else)."""
        props = {}
        for f in fields(cls):
            if f.name not in exclude:
                default = f.default_factory() if f.default is MISSING else f.default
                props[f.name] = {**f.metadata["schema"], "description": f.metadata["help"], "default": default}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

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


def _first_problem(values: dict, schema: dict) -> str | None:
    """What is wrong with the first field (in the dataclass's order) that does not fit `schema`, naming its CLI
    option, or None. Checked by jsonschema; numbers must be finite, as JSON's are (it has no NaN or infinity)."""
    order = list(schema["properties"])
    for name in order:
        value = values[name]
        if schema["properties"][name]["type"] == "number" and isinstance(value, float) and not math.isfinite(value):
            return f"{_option(name)} must be a finite number (got {value})"
    errors = errors_of(values, schema, strict_integers=True)
    if not errors:
        return None
    error = min(errors, key=lambda e: order.index(e.absolute_path[0]) if e.absolute_path else -1)
    if not error.absolute_path:
        return error.message
    name, value, limit = _option(error.absolute_path[0]), error.instance, error.validator_value
    if error.validator == "enum":
        limit = ", ".join(map(str, limit))
    template = _MESSAGES.get(error.validator, "{name}: {message}")
    return template.format(name=name, value=value, limit=limit, message=error.message)


_MESSAGES = {  # what a field's jsonschema error says, in the words of the command line
    "type": "{name} must be of type {limit} (got {value!r})",
    "minimum": "{name} must be >= {limit} (got {value})",
    "exclusiveMinimum": "{name} must be > {limit} (got {value})",
    "maximum": "{name} must be <= {limit} (got {value})",
    "enum": "{name} must be one of {limit} (got {value!r})",
    "minItems": "{name} needs at least {limit} item(s)",
}


def _option(field_name: str) -> str:
    return field_name.replace("_", "-")
