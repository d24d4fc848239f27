"""The experts of one MoE layer behind one call:

    experts(x [N, H], expert_indices [N, K], expert_weights [N, K]) -> [N, H]

Every token row goes to its K experts; each expert's output is weighted in fp32 and the
K results are added in the model dtype in ascending expert order — what the reference
loop (and transformers' eager Mixtral) computes, so every implementation agrees with it
to the rounding of its matrix products (tests/test_experts.py).

Implementations (each an nn.Module with that call):

- `ExpertList`: E `Expert` modules and the per-expert loop, as the Mixtral article teaches
  it. It is what the model is built with, what checkpoints name
  (`layers.N.moe.experts.E.w1.weight`), what trains and what LoRA wraps.
- `StackedExperts`: the inference layout. Gate and up projections of all experts stacked
  `[E, 2F, H]`, down `[E, H, F]` (transformers v5's fused layout, gpt-fast's
  ConditionalFeedForward, mlx-lm's SwitchGLU), in any weight kind (plain, int8, int4,
  oneDNN-packed). Two paths:
    * gather (few token rows): index the chosen experts' weights on the device and
      multiply, no host synchronisation — what a GPU and a compiled step want;
    * sorted (the CPU, or many rows): read the routing on the host, then one product per
      chosen expert over its rows. On the CPU reading the indices is a memory read, not a
      device sync; under torch.compile the path is one opaque custom op
      (`smoe::experts_sorted`, looked up by name as vLLM's attention layers are).
- `OffloadedExperts` (smoe/offload.py): experts fetched from a tiered store.

Transforms reach experts through two methods every implementation has:
`map_experts(fn)` (a per-expert module transform: quantization) and
`for_inference(kernels)` (the stacked layout, in the kind `kernels.stack(rows)` chooses:
smoe/kernels/ asks its backends in order, the weight format's plain PyTorch kind last).
Neither asks what kind of experts module it is given, and nothing here picks a kernel.

Shape legend: N token rows, H hidden, E experts, K experts per token, F expert hidden.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smoe.fsutil import release_module_pages


class Expert(nn.Module):
    """A SwiGLU MLP (Shazeer 2020): w2(silu(w1·x) * w3·x)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)  # down
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# --------------------------------------------------------------------------- dispatch on the host


def dispatch_loop(experts, x: torch.Tensor, expert_indices: torch.Tensor,
                  expert_weights: torch.Tensor) -> torch.Tensor:
    """The reference, as Mixtral is usually taught: for each expert, find its tokens."""
    out = torch.zeros_like(x)  # [N, H]
    for e, expert in enumerate(experts):
        token_idx, slot = torch.where(expert_indices == e)  # tokens routed to e, and which of their K slots
        if token_idx.numel() == 0:
            continue
        y = expert(x[token_idx]).float() * expert_weights[token_idx, slot, None]  # [n_e, H]
        out.index_add_(0, token_idx, y.to(x.dtype))
    return out


def dispatch_sorted(run: Callable[[int, torch.Tensor], torch.Tensor], num_experts: int, x: torch.Tensor,
                    expert_indices: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
    """Routing read on the host, one call `run(e, rows)` per chosen expert.

    One row (decode at batch 1): call its K experts directly, no sorting or scatter.
    Many rows: sort the N*K token slots by expert so each expert multiplies one contiguous
    block, then scatter-add the weighted results back to their tokens."""
    N, K = expert_indices.shape
    if N == 1:  # K experts in ascending order, as the reference adds them
        out = None
        for e, weight in sorted(zip(expert_indices[0].tolist(), expert_weights[0].tolist(), strict=True)):
            y = run(e, x) * weight  # an fp32 weight as a Python float: the product in fp32, rounded once
            out = y if out is None else out + y
        return out
    flat_experts = expert_indices.reshape(-1)  # [N*K]
    order = torch.argsort(flat_experts, stable=True)  # [N*K] slots grouped by expert
    token_of_slot = order // K  # [N*K]
    weight_of_slot = expert_weights.reshape(-1)[order]  # [N*K]
    tokens_per_expert = torch.bincount(flat_experts, minlength=num_experts).tolist()  # one host read
    x_sorted = x[token_of_slot]  # [N*K, H]
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, count in enumerate(tokens_per_expert):
        if count:
            y_sorted[start : start + count] = run(e, x_sorted[start : start + count])
            start += count
    y_sorted = (y_sorted.float() * weight_of_slot[:, None]).to(x.dtype)  # [N*K, H]
    return torch.zeros_like(x).index_add_(0, token_of_slot, y_sorted)


# --------------------------------------------------------------------------- the reference


class ExpertList(nn.ModuleList):
    """E expert modules (`Expert`, or with quantized / LoRA-wrapped linears) and the reference
    per-expert loop. `sorted_dispatch = True` reads the routing on the host instead (the
    path for experts that cannot be stacked, e.g. with LoRA adapters at inference)."""

    sorted_dispatch = False

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        if self.sorted_dispatch:
            return dispatch_sorted(self.expert, len(self), x, expert_indices, expert_weights)
        return dispatch_loop(self, x, expert_indices, expert_weights)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x [n, H] -> [n, H]."""
        return self[e](x)

    def map_experts(self, fn: Callable[[nn.Module], nn.Module]) -> ExpertList:
        for e, expert in enumerate(self):
            self[e] = fn(expert)
        return self

    def for_inference(self, kernels) -> nn.Module:
        """The stacked layout in the kind `kernels.stack(rows)` gives (smoe/kernels/: rows holds,
        per expert, the linears to concatenate along their outputs), or this list read on the
        host when it gives None (linears of no one weight format: LoRA-wrapped, NF4)."""
        linears = [[expert.w1, expert.w3, expert.w2] for expert in self]
        gate_up = kernels.stack([[w1, w3] for w1, w3, _ in linears])  # [E, 2F, H]: gate, then up
        if gate_up is None:
            self.sorted_dispatch = True
            return self
        down = kernels.stack([[w2] for _, _, w2 in linears])  # [E, H, F]
        return StackedExperts(gate_up, down, self[0].w1.out_features)


# --------------------------------------------------------------------------- stacked experts

def stack_rows(rows: list[list[nn.Module]], name: str) -> torch.Tensor:
    """Tensor `name` of E experts' linears, each expert's row concatenated along the outputs (gate
    and up: [w1, w3]), stacked: [E, sum of the row's outputs, ...]. Every stacked kind is made so."""
    return torch.stack([torch.cat([getattr(lin, name).detach() for lin in row]) for row in rows])


class StackedLinear(nn.Module):
    """E bias-free linears of one shape in one tensor: weight [E, out, in]."""

    gather_in_graph = True  # a compiled step's gathered matmuls beat eager F.linear on the CPU

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    @staticmethod
    def stack(rows: list[list[nn.Linear]]) -> StackedLinear:
        """rows: per expert, the linears whose outputs are concatenated."""
        stacked = StackedLinear(stack_rows(rows, "weight"))
        release_module_pages(lin for row in rows for lin in row)  # the stacked copy replaces the file's pages
        return stacked

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's product: x [n, in] -> [n, out]."""
        return F.linear(x, self.weight[e])

    def gathered(self, expert_indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each slot's expert: indices [N, K], x [N, K, in] -> [N, K, out]."""
        weight = self.weight[expert_indices]  # [N, K, out, in]: the chosen experts only
        return torch.matmul(weight, x[..., None])[..., 0]

    def extra_repr(self) -> str:
        E, out_features, in_features = self.weight.shape
        return f"experts={E}, in_features={in_features}, out_features={out_features}, dtype={self.weight.dtype}"


_BY_NAME: weakref.WeakValueDictionary[str, StackedExperts] = weakref.WeakValueDictionary()
_NAMES = itertools.count()


class StackedExperts(nn.Module):
    """All experts of a layer stacked: gate_up [E, 2F, H], down [E, H, F] in one weight kind.

    path: 'auto' (the kind's fused MoE op where it has one and takes these rows — the native
    kernels' `fused_moe`, smoe/kernels/; gather for few rows off the CPU, or inside a compiled
    graph for plain weights; sorted otherwise), 'fused', 'gather' or 'sorted' (tests pin one)."""

    GATHER_MAX_ROWS = 8  # above this many token rows, gathering copies more weights than sorting reads

    def __init__(self, gate_up: nn.Module, down: nn.Module, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up, self.down, self.intermediate_size = gate_up, down, intermediate_size
        self.num_experts = gate_up.num_experts
        self.path = "auto"
        self.can_gather = hasattr(gate_up, "gathered")  # kinds that run on any device
        self.fused = hasattr(gate_up, "fused_moe")  # kinds with one op for all chosen experts (smoe/kernels/)
        # inside a compiled graph on the CPU, gather only where inductor's own kernels beat the
        # kind's eager ones (plain weights; int8/int4 keep their weight-only kernels)
        self.gather_in_graph = getattr(gate_up, "gather_in_graph", False)
        self.name = f"experts-{next(_NAMES)}"  # how the custom op finds this module
        _BY_NAME[self.name] = self

    def __len__(self) -> int:
        return self.num_experts

    def __deepcopy__(self, memo: dict) -> StackedExperts:
        """A copy is another module: it gets its own name for the custom op to find it by."""
        clone = StackedExperts.__new__(StackedExperts)
        memo[id(self)] = clone
        clone.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        clone.name = f"experts-{next(_NAMES)}"
        _BY_NAME[clone.name] = clone
        return clone

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x [n, H] -> [n, H]."""
        h = self.gate_up.one(e, x)  # [n, 2F]: gate, then up
        F_ = self.intermediate_size
        return self.down.one(e, F.silu(h[..., :F_]) * h[..., F_:])

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        path = self.path
        if path == "auto" and self.fused and self.gate_up.takes_fused(x):
            path = "fused"
        if path == "fused":  # all chosen experts in one call of the kind's op
            return self.gate_up.fused_moe(self.down, x, expert_indices, expert_weights)
        if path == "auto":  # gather where the device, or a compiled graph, would otherwise wait on the host
            few = x.shape[0] <= self.GATHER_MAX_ROWS and self.can_gather
            in_graph = torch.compiler.is_compiling() and self.gather_in_graph
            path = "gather" if few and (x.device.type != "cpu" or in_graph) else "sorted"
        if path == "gather":
            return self.gather(x, expert_indices, expert_weights)
        if torch.compiler.is_compiling():  # the host read as one opaque op, so the graph stays whole
            return torch.ops.smoe.experts_sorted(x, expert_indices, expert_weights, self.name)
        return dispatch_sorted(self.expert, self.num_experts, x, expert_indices, expert_weights)

    def gather(self, x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        """Few rows, no host synchronisation: each slot multiplies its own expert's weights."""
        N, K = expert_indices.shape
        chosen, order = torch.sort(expert_indices, dim=1)  # [N, K] ascending, as the reference adds them
        weights = torch.gather(expert_weights, 1, order)  # [N, K]
        h = self.gate_up.gathered(chosen, x[:, None, :].expand(N, K, x.shape[1]))  # [N, K, 2F]
        F_ = self.intermediate_size
        y = self.down.gathered(chosen, F.silu(h[..., :F_]) * h[..., F_:])  # [N, K, H]
        y = (y.float() * weights[..., None]).to(x.dtype)
        out = torch.zeros_like(x)
        for k in range(K):
            out = out + y[:, k]
        return out

    def map_experts(self, fn: Callable[[nn.Module], nn.Module]) -> StackedExperts:
        raise TypeError("stacked experts are the last expert transform: quantize before for_inference")

    def for_inference(self, kernels) -> StackedExperts:
        """Stacked already (a GGUF file's experts, stacked as the file stacks them): the backends
        may take the stacked kinds as they are (Kernels.restack)."""
        gate_up, down = kernels.restack(self.gate_up, self.down)
        if gate_up is self.gate_up and down is self.down:
            return self
        restacked = StackedExperts(gate_up, down, self.intermediate_size)
        restacked.path = self.path
        return restacked

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, intermediate_size={self.intermediate_size}"


@torch.library.custom_op("smoe::experts_sorted", mutates_args=())
def _experts_sorted(x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                    name: str) -> torch.Tensor:
    experts = _BY_NAME[name]
    return dispatch_sorted(experts.expert, experts.num_experts, x, expert_indices, expert_weights)


@_experts_sorted.register_fake
def _(x, expert_indices, expert_weights, name):
    return torch.empty_like(x)
