"""torch.ao's dynamic int8 Linear inside a torch.compile graph, unchanged.

Dynamo cannot trace a torch.ao dynamic quantized Linear (its packed weight is a TorchScript object), so `int8` alone
runs every op of the decode step eagerly: on CPU the int8 GEMVs are a third of a semantic or coarse decode step and
the per-op overhead around them most of the rest. Here each such Linear becomes one opaque custom operator
(`barkbench::dynamic_int8_linear`) that calls the very module, so the same fbgemm/oneDNN kernel computes the same
numbers, while torch.compile compiles everything around it (with `static`: the whole decode step).

The operator finds its module by a handle (a weak reference: a model that is dropped is not kept alive by it). The
module is called with its hooks, inside the operator, where the compiled graph does not see them: the fidelity
check's per-layer hooks go on `CompilableDynamicLinear.linear`.
"""
from __future__ import annotations

import itertools
import weakref

import torch

_MODULES: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("barkbench::dynamic_int8_linear", mutates_args=())
def dynamic_int8_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return _MODULES[handle](x)


@dynamic_int8_linear.register_fake
def _(x, handle, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def is_dynamic_int8(module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized.dynamic")


class CompilableDynamicLinear(torch.nn.Module):
    """A torch.ao dynamic int8 Linear (`linear`, still a submodule: its weight is the model's) called through one
    opaque operator."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.handle = next(_HANDLES)
        _MODULES[self.handle] = linear

    def forward(self, x):
        return dynamic_int8_linear(x, self.handle, self.out_features)


def make_compilable(model) -> int:
    """Wrap each torch.ao dynamic int8 Linear of a BarkModel's three transformers; returns how many."""
    wrapped = 0
    for sub in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
        for name, module in list(sub.named_modules()):
            if is_dynamic_int8(module):
                parent, _, attr = name.rpartition(".")
                setattr(sub.get_submodule(parent), attr, CompilableDynamicLinear(module))
                wrapped += 1
    return wrapped
