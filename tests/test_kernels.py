"""The backend registry (smoe/kernels/): one list per load, each weight to the first backend that
takes it, the format's plain PyTorch reference last, and a report of what ran where and why the
others were not asked (`smoe info --kernels`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import smoe
from smoe import kernels
from smoe.cli import main
from smoe.experts import StackedLinear
from smoe.kernels import native, ops
from smoe.kernels.aten import AtenInt4Linear, AtenStackedInt4
from smoe.quantize import Int4Linear, StackedInt4Linear

CONFIG = {"num_local_experts": 4, "hidden_size": 64, "intermediate_size": 128}


def test_without_the_native_kernels_int4_goes_to_aten_and_the_report_says_why(checkpoint_factory, monkeypatch):
    monkeypatch.setenv("SMOE_NATIVE", "0")
    model, _ = smoe.load(checkpoint_factory(seed=2, **CONFIG), dtype="bf16", quant="int4")
    layers = len(model.layers)
    assert type(model.layers[0].moe.experts.gate_up) is AtenStackedInt4
    assert type(model.layers[0].attn.q_proj) is AtenInt4Linear
    assert model.decode_plan is None
    ran = model.kernels.ran
    assert ran["smoe-int4", "aten-int4", "expert stacks"] == 2 * layers
    assert ran["smoe-int4", "aten-int4", "linears"] == 4 * layers
    assert ran["smoe-int8", "pytorch", "linears"] == 1  # the head: no backend here takes int8
    report = "\n".join(model.kernels.report())
    assert "native: not asked (SMOE_NATIVE=0)" in report
    assert "asked in order aten-int4, onednn, then pytorch" in report


def test_fp32_is_refused_by_the_native_kernels_and_packed_by_onednn(checkpoint_factory):
    model, _ = smoe.load(checkpoint_factory(seed=2, **CONFIG), dtype="fp32")
    report = "\n".join(model.kernels.report())
    reason = native.unavailable_reason() or "the kernels compute in bf16; the model is float32"
    assert f"native: not asked ({reason})" in report
    assert model.decode_plan is None and model.kernels.ran["layers", "native", "decode steps"] == 0
    if torch.backends.mkldnn.is_available():
        assert model.kernels.ran["plain", "onednn", "expert stacks"] == 2 * len(model.layers)


def test_compile_asks_neither_onednn_nor_aten():
    chosen = kernels.for_load(kernels.Target("cpu", torch.bfloat16, compile=True))
    assert {"onednn", "aten-int4"} <= set(chosen.refused)
    assert [b.name for b in chosen.chosen] == (["native"] if native.available() else [])


def test_plain_asks_no_backend_and_off_the_cpu_none_is_asked():
    int4 = Int4Linear.from_linear(torch.nn.Linear(64, 32, bias=False), 32)
    assert type(kernels.PLAIN.stack([[int4]])) is StackedInt4Linear
    on_gpu = kernels.for_load(kernels.Target("cuda", torch.bfloat16))
    assert on_gpu.chosen == [] and set(on_gpu.refused) == {b.name for b in kernels.backends()}
    plain = torch.nn.Linear(64, 32, bias=False)
    assert type(on_gpu.stack([[plain], [plain]])) is StackedLinear
    assert on_gpu.stack([[int4], [plain]]) is None  # mixed formats: no stacked kind, the experts stay a list


def test_smoe_info_kernels(checkpoint_factory, capsys, monkeypatch):
    path = str(checkpoint_factory(seed=2, **CONFIG))
    monkeypatch.setenv("SMOE_NATIVE", "0")
    assert main(["info", path, "--kernels", "--quant", "int4", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "smoe-int4" in out and "-> aten-int4" in out and "native: not asked (SMOE_NATIVE=0)" in out
    assert main(["info", path, "--quant", "int4"]) == 2
    assert "add --kernels" in capsys.readouterr().err


def test_smoe_isa_picks_the_variant_and_a_wrong_one_is_an_error(checkpoint_factory):
    """SMOE_ISA=NAME runs that variant (the report names it); a name that is no variant, or one
    this CPU cannot run, is one line and exit 2, not a silent fallback."""
    if not ops.available():
        pytest.skip(f"native kernels: {ops.unavailable_reason()}")
    path = str(checkpoint_factory(seed=2, **CONFIG))

    def info(isa: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "smoe", "info", path, "--kernels", "--dtype", "bf16"],
                              capture_output=True, text=True, env={**os.environ, "SMOE_ISA": isa})

    for name in ops.variants():
        run = info(name)
        assert run.returncode == 0 and f"native: the {name} kernels" in run.stdout, run.stderr
    cannot = next(n for n in ops.KNOWN_VARIANTS if n not in ops.variants())  # neon on x86, avx512 elsewhere
    for name, says in (("sse9", "is not a kernel variant"), (cannot, "this CPU runs only")):
        run = info(name)
        assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr
