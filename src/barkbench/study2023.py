"""The 2023 study (Hugging Face blog "Optimizing Bark using 🤗 Transformers") as data: how to cite it, its
baseline's name, and which of our optimizations each of its variants corresponds to. The stack it ran on is
`barkbench.legacy`; its published numbers are `report/reference/published_results.csv`."""
from __future__ import annotations

STUDY = ('Hugging Face blog "Optimizing Bark using 🤗 Transformers", Aug 2023 '
         "(<https://huggingface.co/blog/optimizing-bark>)")
PUBLISHED_BASELINE = "no optimization"
PUBLISHED_TO_OURS = {  # the 2023 study's variants -> our optimizations
    "bettertransformer": {"sdpa"},
    "fp16": {"fp16"},
    "offload": {"offload"},
    "offload + bettertransformer": {"offload", "sdpa"},
    "offload + bettertransformer + fp16": {"offload", "sdpa", "fp16"},
}
