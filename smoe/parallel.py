"""Expert and tensor parallelism over torch.distributed: one model spread over N processes
(gloo between CPUs, nccl between GPUs), as a transform of the loaded model.

    torchrun --nproc-per-node 4 -m smoe generate --model DIR --parallel expert -p "Hello"

Expert parallelism (EP, vLLM's scheme without data-parallel attention): each rank holds E/N
experts of every layer; attention, norms, routers, embeddings and the head are replicated. Every
rank routes every token (the same router, the same result), runs its own experts on the token
slots routed to them, and one all-reduce per layer sums the partial outputs.

Tensor parallelism (TP, gpt-fast's scheme): attention split by kv-head groups (rank r holds kv
heads [rG/N, (r+1)G/N) and their query heads: rows of q/k/v, columns of o), the experts along
their ffn dimension (rows of w1/w3, columns of w2); two all-reduces per layer (after attention,
after the experts). Each rank's KV cache holds its own kv heads only.

EP × TP: ranks form an EP × TP grid; attention is split over the TP group of a rank (replicated
across EP groups), experts by expert across EP and along F across TP; the experts' partial
outputs are summed over all ranks.

Worked example, Mixtral-8x7B (E = 8, G = 8 kv heads, F = 14336) on 4 ranks:
    EP:      rank r: experts 2r, 2r+1 (whole); attention whole        -> 1 all-reduce / layer
    TP:      rank r: kv heads 2r, 2r+1 (+ their 8 query heads); every expert's rows
             3584r .. 3584r+3583 of w1/w3 (columns of w2)               -> 2 all-reduces / layer
    EP × TP: grid 2 x 2; rank (e, t): experts 4e .. 4e+3, rows 7168t .. of each; kv heads 4t .. 4t+3

Each rank reads only its own slices of the checkpoint's memory map (experts it does not hold
are never read), so its resident weight bytes are about its share.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from smoe.errors import SmoeError
from smoe.experts import Expert, ExpertList, StackedExperts
from smoe.ggml import BLOCKS, GGMLLinear, StackedGGML

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ParallelSpec:
    expert: bool = False
    tensor: bool = False

    @staticmethod
    def parse(text: str) -> ParallelSpec:
        parts = {p.strip() for p in text.split(",") if p.strip()}
        if not parts or parts - {"expert", "tensor"}:
            raise SmoeError(f"--parallel {text!r}: use expert, tensor or expert,tensor")
        return ParallelSpec(expert="expert" in parts, tensor="tensor" in parts)

    def __str__(self) -> str:
        return ",".join(n for n, on in (("expert", self.expert), ("tensor", self.tensor)) if on)


@dataclass(frozen=True)
class Mesh:
    """Where this rank sits: world = ep_size x tp_size; rank = ep_rank * tp_size + tp_rank."""

    rank: int
    world: int
    ep_size: int
    tp_size: int
    tp_group: object = None  # the ranks sharing this rank's attention split (None: the whole world)

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size


# ------------------------------------------------------------------------------ processes


def launched() -> bool:
    """Started by torchrun (or anything that sets its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (env://): gloo on CPUs, nccl on GPUs. A rank
    that dies or cannot be reached makes the others' next collective fail after `timeout_s`
    (SMOE_DIST_TIMEOUT, default 60 s) instead of hanging. -> (rank, world size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    timeout = float(timeout_s or os.environ.get("SMOE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("SMOE_DIST_BACKEND") != "gloo" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise SmoeError(f"cannot join the other processes ({os.environ.get('MASTER_ADDR')}:"
                        f"{os.environ.get('MASTER_PORT')}, rank {os.environ.get('RANK')} of "
                        f"{os.environ.get('WORLD_SIZE')}): {e}") from None
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def make_mesh(spec: ParallelSpec, rank: int, world: int) -> Mesh:
    if spec.expert and spec.tensor:
        tp = int(os.environ.get("SMOE_TP_SIZE", "0")) or _default_tp(world)
        if world % tp:
            raise SmoeError(f"SMOE_TP_SIZE={tp} does not divide the {world} processes")
        ep = world // tp
    else:
        ep, tp = (world, 1) if spec.expert else (1, world)
    tp_group = None
    if spec.tensor and ep > 1:  # one TP group per EP index; every rank must create every group
        for e in range(ep):
            group = dist.new_group(list(range(e * tp, (e + 1) * tp)))
            if rank // tp == e:
                tp_group = group
    return Mesh(rank, world, ep, tp, tp_group)


def _default_tp(world: int) -> int:
    """EP x TP on N ranks: the TP size the largest divisor of N not above sqrt(N) (4 -> 2 x 2)."""
    return max(d for d in range(1, int(world**0.5) + 1) if world % d == 0)


def broadcast_seed(seed: int | None) -> int:
    """Sampling must draw the same tokens on every rank: rank 0's seed for all."""
    import random

    value = torch.tensor([seed if seed is not None else random.SystemRandom().randrange(2**62)], dtype=torch.long)
    dist.broadcast(value, 0)
    return int(value.item())


# --------------------------------------------------------------------------------- modules


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of every rank's partial output. Backward: the output's gradient as it
    is, which each rank already holds whole (everything after the sum is replicated and computed
    the same on every rank), so nothing is exchanged (Megatron's reduce-from-model-parallel)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _CopyToRanks(torch.autograd.Function):
    """Forward: the experts' inputs (x [N, H], expert_weights [N, K]) as they are, every rank
    holding them whole. Backward: the sum of every rank's gradients, because each rank's experts
    give only their part of d(loss)/d(input) (Megatron's copy-to-model-parallel). One function
    for both, so that every rank runs the same collectives in the same order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, group):
        ctx.group = group
        return x.view_as(x), weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor, grad_weights: torch.Tensor):
        grad_x, grad_weights = grad_x.clone(), grad_weights.clone()
        dist.all_reduce(grad_x, group=ctx.group)
        dist.all_reduce(grad_weights, group=ctx.group)
        return grad_x, grad_weights, None


def _training(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if _training(t):  # training (LoRA): through autograd
        return _SumOverRanks.apply(t, group)
    dist.all_reduce(t, group=group)
    return t


class ShardedExperts(nn.Module):
    """This rank's experts `first .. first+count-1` of a layer (each maybe a TP slice along F):
    runs them on the token slots routed to them and sums every rank's partial outputs.
    The call is every experts module's: experts(x [N, H], expert_indices [N, K],
    expert_weights [N, K]) -> [N, H]."""

    def __init__(self, experts: nn.Module, first: int, count: int, group=None) -> None:
        super().__init__()
        self.experts = experts  # an experts module over local ids 0 .. count-1
        self.first, self.count, self.group = first, count, group

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        training = _training(x, expert_weights)
        if training:  # the inputs' gradients are the sum of every rank's part
            x, expert_weights = _CopyToRanks.apply(x, expert_weights, self.group)
        local = (expert_indices >= self.first) & (expert_indices < self.first + self.count)  # [N, K]
        token, slot = local.nonzero(as_tuple=True)  # the slots this rank computes
        out = torch.zeros_like(x)  # [N, H]
        if training:  # in the graph even without local tokens: every rank's backward meets the others'
            out = out + 0 * (x.sum() + expert_weights.sum())
        if token.numel():
            ids = (expert_indices[token, slot] - self.first)[:, None]  # [n, 1] local expert ids
            partial = self.experts(x[token], ids, expert_weights[token, slot][:, None])  # [n, H]
            out.index_add_(0, token, partial)
        return _all_reduce(out, self.group)

    def __iter__(self):  # the local experts, for what walks a layer's experts (LoRA's targets)
        return iter(self.experts)

    def __len__(self) -> int:
        return self.count

    def map_experts(self, fn) -> ShardedExperts:
        self.experts = self.experts.map_experts(fn)
        return self

    def for_inference(self, kernels) -> ShardedExperts:
        self.experts = self.experts.for_inference(kernels)
        return self

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.count - 1}"


# ------------------------------------------------------------------------------- transform


def parallelize(model: nn.Module, spec: ParallelSpec, mesh: Mesh, sources: dict[str, torch.Tensor] | None = None
                ) -> nn.Module:
    """Keep this rank's share of `model` (built and loaded; with `sources`, the experts are still
    unread views of the checkpoint, by parameter name, and only this rank's slices are read)."""

    config = model.config
    E, G, Q, F = (config.num_local_experts, config.num_key_value_heads, config.num_attention_heads,
                  config.intermediate_size)
    ep, tp = mesh.ep_size, mesh.tp_size
    if E % ep:
        raise SmoeError(f"--parallel expert: {E} experts do not split over {ep} processes; use a divisor of {E}")
    if tp > 1 and (G % tp or F % tp):
        raise SmoeError(f"--parallel tensor: {G} kv heads and ffn size {F} must both divide by {tp} processes")
    if sources is None and any(p.is_meta for p in model.parameters()):
        raise SmoeError("parallelize: the experts are not loaded and no sources were given")
    count, first = E // ep, mesh.ep_rank * (E // ep)
    f_rows = slice(mesh.tp_rank * (F // tp), (mesh.tp_rank + 1) * (F // tp))
    dtype = model.dtype
    for i, layer in enumerate(model.layers):
        if tp > 1:
            _split_attention(layer.attn, mesh, config)
            layer.attn.register_forward_hook(lambda m, args, out, g=mesh.tp_group: _all_reduce(out, g))
        if isinstance(layer.moe.experts, StackedExperts) and isinstance(layer.moe.experts.gate_up, StackedGGML):
            layer.moe.experts = ShardedExperts(_gguf_share(layer.moe.experts, first, count, f_rows, tp, i), first,
                                               count)
            continue
        experts = ExpertList()
        for e in range(first, first + count):
            with torch.device("meta"):
                expert = Expert(config.hidden_size, F // tp)
            for name, rows, cols in (("w1", f_rows, None), ("w3", f_rows, None), ("w2", None, f_rows)):
                w = _stored(sources, layer, f"layers.{i}.moe.experts.{e}.{name}.weight", e, name)
                w = w[rows] if rows is not None else w[:, cols]
                # .to(...).clone(): reads only this slice of the checkpoint's memory map
                getattr(expert, name).weight = nn.Parameter(w.to(dtype).clone(), requires_grad=False)
            experts.append(expert)
        layer.moe.experts = ShardedExperts(experts, first, count)
    # what this rank's caches and layers hold: its kv heads, its slice of F
    model.config = dataclasses.replace(config, num_attention_heads=Q // tp, num_key_value_heads=G // tp,
                                       head_dim=config.head_dim, intermediate_size=F // tp)
    model.parallel = (spec, mesh)
    return model


def _block_columns(blocks: torch.Tensor, kind: str, cols: slice, what: str) -> torch.Tensor:
    """Columns `cols` of GGML block rows [..., N, row bytes] (whole blocks only), copied contiguous."""
    elems, nbytes = BLOCKS[kind]
    if cols.start % elems or cols.stop % elems:
        raise SmoeError(f"--parallel tensor: {what} is {kind}, whose rows split only at multiples of {elems} "
                        f"values; a rank's share starts at {cols.start}. Use fewer processes, expert "
                        "parallelism, or convert the file (--no-gguf-in-place)")
    return blocks[..., cols.start // elems * nbytes : cols.stop // elems * nbytes].contiguous()


def _gguf_share(experts: StackedExperts, first: int, count: int, f_rows: slice, tp: int, layer: int
                ) -> StackedExperts:
    """This rank's experts of a GGUF file in place: experts first .. first+count-1 of the stacked
    blocks (a view of the file: only those pages are ever read), under TP their rows f_rows of gate
    and up and those columns of down (copies: the rank's slice)."""
    gu, dn = experts.gate_up, experts.down
    parts = []
    for i, kind in enumerate(gu.kinds):
        blocks = getattr(gu, f"blocks{i}")[first : first + count]
        parts.append((blocks[:, f_rows].contiguous() if tp > 1 else blocks, kind))
    down = dn.blocks0[first : first + count]
    if tp > 1:
        down = _block_columns(down, dn.kinds[0], f_rows, f"layer {layer}'s ffn_down_exps")
    F = f_rows.stop - f_rows.start
    return StackedExperts(StackedGGML(parts, gu.in_features), StackedGGML([(down, dn.kinds[0])], F), F)


def _stored(sources: dict | None, layer: nn.Module, key: str, e: int, name: str) -> torch.Tensor:
    """An expert weight: its unread view in the checkpoint, or the loaded parameter."""
    return sources[key] if sources is not None else layer.moe.experts[e].get_submodule(name).weight


def _split_attention(attn: nn.Module, mesh: Mesh, config) -> None:
    """Rank t of the TP group keeps kv heads [tG/T, (t+1)G/T) and the query heads that read them."""
    tp, t, D = mesh.tp_size, mesh.tp_rank, config.head_dim
    kv = slice(t * (attn.n_kv_heads // tp) * D, (t + 1) * (attn.n_kv_heads // tp) * D)
    q = slice(t * (attn.n_heads // tp) * D, (t + 1) * (attn.n_heads // tp) * D)

    def keep(name: str, rows=None, cols=None) -> None:
        linear = getattr(attn, name)
        if isinstance(linear, GGMLLinear):  # a GGUF file's blocks in place: rows are views, columns whole blocks
            blocks = linear.blocks[rows] if rows is not None else _block_columns(linear.blocks, linear.kind, cols,
                                                                                  f"attention's {name}")
            width = linear.in_features if rows is not None else cols.stop - cols.start
            setattr(attn, name, GGMLLinear.of(blocks, linear.kind, width))
            return
        w = linear.weight
        w = w[rows] if rows is not None else w[:, cols]
        linear.weight = nn.Parameter(w.clone(), requires_grad=False)
        linear.out_features, linear.in_features = linear.weight.shape

    keep("q_proj", rows=q)
    keep("k_proj", rows=kv)
    keep("v_proj", rows=kv)
    keep("o_proj", cols=q)
    attn.n_heads //= tp
    attn.n_kv_heads //= tp


# ---------------------------------------------------------------------- data parallel training


class DataParallel:
    """`smoe train` / `finetune` under torchrun: every rank holds the whole model (and its
    adapters), takes rows rank, rank+N, ... of each batch, and the gradients are averaged over
    the ranks before clipping, so every rank makes the same update. With equal rows per rank
    (batch size a multiple of N, full chunks) the averaged gradient is the one-process gradient
    of the whole batch's mean loss (the router's balancing loss, nonlinear in the batch, is
    computed per rank)."""

    def __init__(self) -> None:
        self.rank, self.world = init()

    def rows(self, *tensors: torch.Tensor | None) -> tuple:
        return tuple(None if t is None else t[self.rank :: self.world] for t in tensors)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])  # one collective for all of them
        dist.all_reduce(flat)
        flat /= self.world
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()

    def average(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}


def expert_bytes(model: nn.Module) -> int:
    """Bytes of expert weights this process holds."""
    return sum(p.numel() * p.element_size() for layer in model.layers for p in layer.moe.experts.parameters())
