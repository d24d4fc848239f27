"""The backend registry: for each weight format (smoe/weights.py), the backends that can
multiply it, asked in order, the format's plain PyTorch reference last.

A backend says which formats it runs, why it would refuse a whole load (the CPU lacks its
instructions, the model is not on the CPU, torch.compile is asked for), and how it repacks
one linear or one layer's stacked experts into its own layout — returning None for a weight
it cannot take (its dtype). It is registered once, by its own module:

    register_backend(Backend("onednn", formats=("plain",), refuses=onednn_refuses,
                             linear=onednn_linear, stack=PackedLinears.stack, kinds=(PackedLinear, PackedLinears)))

The loader builds a `Kernels` for a load from its `Target` (device, dtype, compile) once;
every layer then takes the first backend that accepts it (ggml asks its extra buffer types
first and the generic CPU path last; vLLM asks the quant config once per layer). `report()`
says which backend runs which weights, and why the better ones were refused
(`smoe info --kernels`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from smoe.experts import StackedExperts
from smoe.fsutil import release_module_pages
from smoe.weights import Rows, format_of

PYTORCH = "pytorch"  # the name the formats' plain reference runs under in reports


@dataclass(frozen=True)
class Target:
    """What a load asks of its kernels: the device and dtype the model computes in, whether a
    compiled decode step will trace it (torch.compile packs its own weights), and whether its
    weights are a GGUF file's blocks used in place."""

    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    compile: bool = False
    gguf: bool = False


@dataclass(frozen=True)
class Backend:
    """A set of kernels for some weight formats.

    formats: the format names (smoe/weights.py) it runs.
    refuses: Target -> why it cannot run that load at all, or None.
    linear: one linear of its formats -> the module that runs it here, or None (not this one).
    stack: rows of E experts' linears -> the stacked kind that runs them here, or None.
    kinds: the module types it makes (a model holding them is in the inference layout).
    restack: a format's plain stacked kind, as a loader stacked it (GGUF files stack their experts)
        -> the stacked kind that runs it here, or None.
    decode: a hook the loader calls last on the whole model (a decode-step plan), or None.
    detail: what the report adds of a backend it asked (the native kernels: their variant), or None."""

    name: str
    formats: tuple[str, ...]
    refuses: Callable[[Target], str | None]
    linear: Callable[[nn.Module], nn.Module | None] | None = None
    stack: Callable[[Rows], nn.Module | None] | None = None
    restack: Callable[[nn.Module], nn.Module | None] | None = None
    kinds: tuple[type, ...] = ()
    decode: Callable[[nn.Module], int] | None = None
    detail: Callable[[], str] | None = None


_BACKENDS: list[Backend] = []


def register_backend(backend: Backend) -> Backend:
    """Add a backend, asked after those registered before it (smoe/kernels/__init__.py's order)."""
    if any(b.name == backend.name for b in _BACKENDS):
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _BACKENDS.append(backend)
    return backend


def backends() -> list[Backend]:
    return list(_BACKENDS)


def in_inference_layout(model: nn.Module) -> bool:
    """Holds stacked experts or a backend's repacked weights, which no checkpoint layout names."""
    kinds = tuple(kind for b in _BACKENDS for kind in b.kinds) + (StackedExperts,)
    return any(isinstance(m, kinds) for m in model.modules())


class Kernels:
    """The backends one load uses, in order, and a record of which ran which weights.

    `Kernels(None)` (PLAIN) asks none: every format's plain PyTorch layout (training, saving,
    tests' references)."""

    def __init__(self, target: Target | None) -> None:
        self.target = target
        self.chosen: list[Backend] = []
        self.refused: dict[str, str] = {}
        for backend in _BACKENDS if target is not None else ():
            reason = backend.refuses(target)
            if reason is None:
                self.chosen.append(backend)
            else:
                self.refused[backend.name] = reason
        self.ran: Counter[tuple[str, str, str]] = Counter()  # (format, backend, "linears" | "expert stacks")

    def _asked(self, format_name: str, make: str) -> list[Backend]:
        return [b for b in self.chosen if format_name in b.formats and getattr(b, make) is not None]

    def stack(self, rows: Rows) -> nn.Module | None:
        """E experts' linears (per expert, those concatenated along their outputs) in the first
        backend's stacked kind that takes them, else their format's plain one; None where they
        are of no one registered format (LoRA-wrapped, NF4: such experts stay a list)."""
        kinds = {type(lin) for row in rows for lin in row}
        fmt = format_of(rows[0][0]) if len(kinds) == 1 else None
        if fmt is None:
            return None
        for backend in self._asked(fmt.name, "stack"):
            stacked = backend.stack(rows)
            if stacked is not None:
                release_module_pages(lin for row in rows for lin in row)  # the repacked copy replaces the file's
                self.ran[fmt.name, backend.name, "expert stacks"] += 1
                return stacked
        self.ran[fmt.name, PYTORCH, "expert stacks"] += 1
        return fmt.stack(rows)

    def restack(self, gate_up: nn.Module, down: nn.Module) -> tuple[nn.Module, nn.Module]:
        """A layer's experts in a format's plain stacked kinds (`format_name`), as a loader stacked
        them (GGUF files stack their experts), in the first backend's kinds that take both (their
        tensors as they are: GGUF blocks stay views of the file), else as they are."""
        name = getattr(gate_up, "format_name", None)
        for backend in self._asked(name, "restack") if name is not None else ():
            pair = backend.restack(gate_up), backend.restack(down)
            if all(kind is not None for kind in pair):
                self.ran[name, backend.name, "expert stacks"] += 1
                return pair
        if name is not None:
            self.ran[name, PYTORCH, "expert stacks"] += 1
        return gate_up, down

    def repack_linears(self, model: nn.Module) -> int:
        """Swap every linear of a registered format (attention, the output head, adapters' A and
        B) for the first backend's module that takes it; returns how many were swapped."""
        count = 0
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                fmt = format_of(child)
                if fmt is None:
                    continue
                for backend in self._asked(fmt.name, "linear"):
                    repacked = backend.linear(child)
                    if repacked is not None:
                        setattr(parent, name, repacked)
                        release_module_pages([child])  # the repacked copy replaces the file's pages
                        self.ran[fmt.name, backend.name, "linears"] += 1
                        count += 1
                        break
                else:
                    self.ran[fmt.name, PYTORCH, "linears"] += 1
        return count

    def plan_decode(self, model: nn.Module) -> int:
        """Let each chosen backend with a decode-step plan attach it (the first that takes the
        model; none under torch.compile, whose compiled step traces the modules); returns how
        many layers it covers."""
        for backend in self.chosen if not self.target.compile else ():
            if backend.decode is not None:
                covered = backend.decode(model)
                if covered:
                    self.ran["layers", backend.name, "decode steps"] += covered
                    return covered
        return 0

    def report(self) -> list[str]:
        """Which backend runs which weights, then why the others were not asked."""
        target = self.target
        lines = ["kernels: plain PyTorch (no backend asked)"] if target is None else [
            f"kernels for {target.device}, {str(target.dtype).removeprefix('torch.')}"
            + (", torch.compile" if target.compile else "")
            + f": asked in order {', '.join(b.name for b in self.chosen) or '(none)'}, then {PYTORCH}"]
        for (fmt, backend, what), count in sorted(self.ran.items()):
            lines.append(f"  {fmt:10s} {count:5d} {what:13s} -> {backend}")
        for backend in self.chosen:
            if backend.detail is not None:
                lines.append(f"  {backend.name}: {backend.detail()}")
        for name, reason in self.refused.items():
            lines.append(f"  {name}: not asked ({reason})")
        return lines


PLAIN = Kernels(None)
