"""The same answer on every CPU. aten compiles its CPU kernels for several capabilities and picks
one at run time (ATEN_CPU_CAPABILITY: default, avx2, avx512), and what they compute can differ
between them — its int4 kernel even reads a different byte layout under each. The tests marked
`capability` (int8 / int4 products, quantized models and their perplexity, checkpoints written
before format 1) run here in-process under this CPU's best capability, and again in a subprocess
under each lower one it can run, so a machine of one kind catches a break on another."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ATEN_CAPABILITIES, ROOT, capability_env, cpu_capabilities, current_capability


@pytest.mark.capability
def test_the_capability_is_the_one_asked_for():
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if asked is None:
        assert current_capability() == cpu_capabilities()[-1]
    else:
        assert torch.backends.cpu.get_cpu_capability().lower() == asked


@pytest.mark.parametrize("capability", ATEN_CAPABILITIES)
def test_the_capability_tests_pass_under(capability):
    if capability not in cpu_capabilities():
        pytest.skip(f"this CPU cannot run ATEN_CPU_CAPABILITY={capability} (it runs {', '.join(cpu_capabilities())})")
    if capability == current_capability():
        pytest.skip(f"{capability} is this process's capability: the marked tests run in it")
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "capability", "-q", "-p", "no:cacheprovider",
                        "tests"], cwd=ROOT, env=capability_env(capability), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"under ATEN_CPU_CAPABILITY={capability}:\n{r.stdout[-8000:]}"
    assert " passed" in r.stdout.splitlines()[-1]
