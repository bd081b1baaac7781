"""A machine's folder name (barkbench.provenance.hardware_id) tells apart CPUs that a hypervisor names alike."""
from __future__ import annotations

import os

import torch

from barkbench import provenance

ZEN2 = {"model name": "AMD EPYC", "cpu family": "23", "model": "49", "flags": "fpu avx avx2 fma"}
ZEN5 = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "fpu avx avx2 avx512f avx512_bf16"}
SPR = {"model name": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpu family": "6", "model": "143"}


def _id(monkeypatch, cpuinfo: dict) -> str:
    monkeypatch.setattr(provenance, "_cpuinfo", lambda: cpuinfo)
    return provenance.hardware_id(torch.device("cpu"))


def test_two_generations_under_one_generic_name_get_their_own_folders(monkeypatch):
    zen2, zen5 = _id(monkeypatch, ZEN2), _id(monkeypatch, ZEN5)
    assert zen2 != zen5
    assert zen2 == f"cpu-amd-epyc-f23-m49-{os.cpu_count()}t"
    assert provenance.native_cpu_features() == ["avx2", "avx512f", "avx512_bf16"]  # of the CPU patched in last


def test_a_cpu_named_with_its_model_number_keeps_its_name(monkeypatch):
    assert _id(monkeypatch, SPR) == f"cpu-intel-xeon-platinum-8481c-{os.cpu_count()}t"


def test_the_cpuinfo_parser_reads_this_machines_first_processor():
    info = provenance._cpuinfo()
    if "model name" in info and "cpu family" in info:  # x86 Linux
        assert provenance.cpu_model() == info["model name"] and provenance.cpu_generation().startswith("family ")
