"""The decode-step plan: a decode step's decoder layers as native calls.

A decode step (one new token per row over a KV cache, bf16, at most MAX_ROWS rows) through a
Block whose parts the kernels all read — the attention norm, q/k/v/o, the experts' norm, the
router and the stacked experts in the native kinds (smoe/kernels/native.py) — is one call of
`smoe::decode_layer`: norms, q/k/v, RoPE, cache write, attention, o, router, the fused
experts, both residuals. When every layer would take it, the step's layers are one call of
`smoe::decode_layers`; and when the embedding, the final norm and the head are ones the kernels
read too, the whole step — token ids to logits and greedy tokens — is one call of
`smoe::decode_step` (`DecodePlan.step`, through `Transformer.decode_step`, which the Engine calls
with Python numbers before it builds any tensor).

`DecodePlan` is an object the model calls (`Transformer.decode_plan`, asked by `run_layers`),
not a class swapped into live modules: the Blocks stay Blocks. A layer that something hooks
(a forward hook or pre-hook on it or one of its parts, or a global one), or whose parts were
swapped for ones the op does not compute (LoRA, offloaded or sharded experts, fp32,
PyTorch's kinds), runs through its modules, so hooks fire as they would without the plan.
Every other call — prefill, training, a compiled step — runs the modules.

The model's final RMSNorm becomes a NativeRMSNorm (smoe::rms_norm for a decode step's rows).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

from smoe.experts import StackedExperts
from smoe.fsutil import huge_page_gather
from smoe.ggml import TYPE_IDS, GGMLEmbedding
from smoe.kernels.ops import MAX_ROWS, available
from smoe.model import Attention, Block, MoE, RMSNorm, Router

_NO_SCALE = torch.empty(0)


def _kernel_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, scale) of a native kind as smoe::decode_layer reads it (its `decode_tensors`), or None."""
    names = getattr(type(module), "decode_tensors", None)
    if names is None:
        return None
    weight, scale = names
    return getattr(module, weight), _NO_SCALE if scale is None else getattr(module, scale)


def _parts(block: nn.Module) -> tuple[nn.Module, ...]:
    """The modules a Block's decode step runs (read from the module dicts: this runs every step)."""
    mods = block._modules
    attn, moe = mods["attn"], mods["moe"]
    a, m = attn._modules, moe._modules
    return (mods["attn_norm"], mods["ffn_norm"], attn, a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], moe,
            m["router"], m["experts"])


def decode_weights(block: nn.Module) -> list[torch.Tensor] | None:
    """The tensors smoe::decode_layer takes for this Block, or None where some part of it is
    not one the op computes (LoRA, offloaded or sharded experts, fp32, PyTorch's kinds)."""
    attn, moe = block.attn, block.moe
    if not (type(block) is Block and type(attn) is Attention and type(moe) is MoE and type(moe.router) is Router
            and type(block.attn_norm) is RMSNorm and type(block.ffn_norm) is RMSNorm
            and type(moe.experts) is StackedExperts and moe.experts.path == "auto"
            and block.attn_norm.eps == block.ffn_norm.eps):
        return None
    small = [block.attn_norm.weight, block.ffn_norm.weight, moe.router.weight]
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() for t in small):
        return None
    pairs = [_kernel_weights(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                          moe.experts.gate_up, moe.experts.down)]
    if any(p is None for p in pairs):
        return None
    up = getattr(moe.experts.gate_up, "decode_up", None)  # GGUF's experts keep up apart from gate
    return [t.detach() for t in small] + [t for pair in pairs for t in pair] + [_NO_SCALE if up is None else up]


def _hook_dicts(modules: tuple[nn.Module, ...]) -> tuple[dict, ...]:
    """The dicts a forward hook on any of `modules` would be in (torch's own, global ones first):
    any() of them is whether something hooks them."""
    m = torch_module
    return (m._global_forward_hooks, m._global_forward_pre_hooks,
            *(d for mod in modules for d in (mod._forward_hooks, mod._forward_pre_hooks)))


def decode_tensor_owners(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every tensor smoe::decode_layer reads from this Block, in the order
    one step reads them: the attention norm, q/k/v's weights one after another (then their
    scales), o, the experts' norm, the router, the experts'."""
    attn, moe = block.attn, block.moe
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    owners = [(block.attn_norm, "weight")]
    owners += [(lin, type(lin).decode_tensors[0]) for lin in projections]
    owners += [(lin, type(lin).decode_tensors[1]) for lin in projections]
    owners += [(attn.o_proj, name) for name in type(attn.o_proj).decode_tensors]
    owners += [(block.ffn_norm, "weight"), (moe.router, "weight")]
    for stacked in (moe.experts.gate_up, moe.experts.down):
        owners += [(stacked, name) for name in type(stacked).decode_tensors]
    return [(module, name) for module, name in owners if name is not None]


def _gather_in_huge_pages(block: nn.Module) -> None:
    """Move the tensors a decode step reads from this Block into one huge-page region
    (fsutil.huge_page_gather), in the order they are read: the attention weights (0.5 MiB each
    at hidden 1024) are too small for a huge page of their own, and on 4 KiB pages the kernels
    read them at ~20 GB/s where they read huge pages at ~26 (docs/KERNELS.md)."""
    owners = decode_tensor_owners(block)
    tensors = [getattr(module, name).detach() for module, name in owners]
    for (module, name), copy in zip(owners, huge_page_gather(tensors), strict=True):
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(copy, requires_grad=module._parameters[name].requires_grad)
        else:
            module._buffers[name] = copy


class NativeRMSNorm(RMSNorm):
    """The model's final RMSNorm, as smoe::rms_norm (decode_layer's arithmetic) for a decode
    step's few bf16 rows: one call instead of six PyTorch ops; anything else runs the module."""

    @classmethod
    def from_norm(cls, norm: RMSNorm) -> NativeRMSNorm:
        with torch.device("meta"):
            native = cls(norm.weight.shape[0], norm.eps)
        native.weight = norm.weight  # the same parameter: only the forward differs
        return native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.numel() > MAX_ROWS * x.shape[-1]
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or torch.compiler.is_compiling()):
            return super().forward(x)
        return torch.ops.smoe.rms_norm(x.contiguous(), self.weight, self.eps)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its elements are already one dense run (the op checks only that and the
    count): a reshape or contiguous() is a dispatcher call, and Python between decode steps
    runs with caches the weights have just flushed."""
    return t if t.is_contiguous() else t.contiguous()


class _LayerArgs:
    """What smoe::decode_layer takes for one Block, read again whenever one of its parts is swapped."""

    __slots__ = ("parts", "weights", "meta", "hooks")

    def __init__(self, block: nn.Module, parts: tuple[nn.Module, ...]) -> None:
        self.parts, self.weights = parts, decode_weights(block)
        attn = block.attn
        self.meta = [attn.n_heads, attn.n_kv_heads, block.moe.router.top_k, attn.layer_idx]
        self.hooks = _hook_dicts((block, *parts))


class DecodePlan:
    """A decode step's layers as smoe::decode_layers (all of them, one call) or, where some
    layer must run its modules, smoe::decode_layer per layer that can; None for any other call
    (Transformer.run_layers then runs the modules)."""

    def __init__(self, layers: int) -> None:
        self._args: list[_LayerArgs | None] = [None] * layers
        self.layers = layers
        self._program: _StepProgram | None = None  # what step() passes, while nothing changes

    def layer_args(self, i: int, block: nn.Module) -> tuple[list, list, float] | None:
        """(weights, [Q, G, top-k, layer], eps) for smoe::decode_layer, or None where a part was
        swapped for one the op does not compute or anything hooks this Block or its parts."""
        parts = _parts(block)
        args = self._args[i]
        if args is None or parts != args.parts:  # a part was swapped since: read the weights again
            args = self._args[i] = _LayerArgs(block, parts)
        if args.weights is None or any(args.hooks):
            return None
        return args.weights, args.meta, parts[0].eps

    def __call__(self, layers: nn.ModuleList, x: torch.Tensor, ctx) -> torch.Tensor | None:
        B, T, H = x.shape
        cache = ctx.cache
        if (T != 1 or cache is None or cache.plan.static or B > MAX_ROWS or x.dtype != torch.bfloat16
                or x.requires_grad or torch.compiler.is_compiling() or len(layers) != self.layers):
            return None
        plan = cache.plan  # the op reads these as flat rows: [B] slots, [B, kv_len] mask, [B, D] cos / sin
        mask = None if plan.mask is None else _dense(plan.mask)
        slots, kv_len, cos, sin = _dense(plan.write_slots), plan.kv_len, _dense(ctx.cos), _dense(ctx.sin)
        row0 = plan.rows.start
        every = [self.layer_args(i, layer) for i, layer in enumerate(layers)]
        if all(args is not None for args in every):  # the whole step in one call
            weights, layer_meta, eps = _flat(every)
            y = torch.ops.smoe.decode_layers(x.view(B, H), weights, _meta(layer_meta, ctx.pairs, row0), eps, cache.k,
                                             cache.v, slots, mask, kv_len, cos, sin)
            return y.view(B, 1, H)
        for layer, args in zip(layers, every, strict=True):
            if args is None:  # hooked, or a part the op does not compute: its modules
                x = layer(x, ctx)
                continue
            weights, meta, eps = args
            x = torch.ops.smoe.decode_layer(x.view(B, H), weights, _meta([meta], ctx.pairs, row0), eps, cache.k,
                                            cache.v, slots, mask, kv_len, cos, sin).view(B, 1, H)
        return x

    def step(self, model: nn.Module, tokens: list[int], positions: list[int], cache
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A whole decode step as one smoe::decode_step (Transformer.decode_step): the embedding,
        every layer, the final norm and the head, or None where some part must run its module —
        a layer as layer_args refuses it, an embedding, norm or head of another kind, anything
        hooked (the model's forward hooks included: they would not see this step), a static
        cache, gradients, more than MAX_ROWS rows."""
        B = len(tokens)
        if B > MAX_ROWS or cache.static or torch.is_grad_enabled():
            return None
        program = self._program
        if program is None or program.stamp != _stamp() or program.model() is not model:
            program = self._program = _StepProgram.of(self, model)
            if program is None:
                return None
        row0 = cache.rows.start
        if B == 1:  # planned in Python numbers (KVCache.begin_one, RotaryEmbedding.at)
            plan = cache.begin_one(positions[0])
            cos, sin = program.rope.at(positions[0], program.dtype)
        else:
            where = torch.tensor(positions)[:, None]  # [B, 1]
            plan = cache.begin(where)
            cos, sin = program.rope(where, program.dtype)
        meta = program.meta.get(row0)
        if meta is None:
            meta = program.meta[row0] = _meta(program.layer_meta, program.rope.pairs, row0)
        mask = None if plan.mask is None else _dense(plan.mask)
        return torch.ops.smoe.decode_step(tokens, *program.table, program.weights, meta, program.eps, cache.k, cache.v,
                                          _dense(plan.write_slots), mask, plan.kv_len, _dense(cos), _dense(sin),
                                          program.norm, program.norm_eps, *program.head)


# What a kept step program depends on beyond its tensors: every hook registered since (each gets
# the next RemovableHandle id, forward hooks and global ones alike) and every module, parameter
# or buffer assigned since (Module.__setattr__, register_*, ModuleList items: counted by global
# registration hooks). Either one moving reads the model again.
_registrations = [0]


def _count_registration(*args) -> None:
    _registrations[0] += 1


for _register in (torch_module.register_module_module_registration_hook,
                  torch_module.register_module_parameter_registration_hook,
                  torch_module.register_module_buffer_registration_hook):
    _register(_count_registration)


def _stamp() -> tuple[int, int]:
    return RemovableHandle.next_id, _registrations[0]


class _StepProgram:
    """smoe::decode_step's arguments for one model, read once and kept while nothing is hooked or
    assigned anywhere (`_stamp`): a step then reads a few Python numbers instead of walking ~70
    modules and ~150 hook dicts, whose interpreter work runs with caches the weights have just
    flushed (~50 us a step on the demo model)."""

    __slots__ = ("stamp", "model", "table", "weights", "layer_meta", "eps", "norm", "norm_eps", "head", "rope",
                 "dtype", "meta")

    @classmethod
    def of(cls, plan: DecodePlan, model: nn.Module) -> _StepProgram | None:
        stamp = _stamp()
        mods = model._modules
        embed, norm, head, rope = mods["embed_tokens"], mods["norm"], mods["lm_head"], mods["rope"]
        if type(norm) is not NativeRMSNorm or any(_hook_dicts((model, embed, norm, head, rope))):
            return None
        table, head_weights = _table(embed), _kernel_weights(head)
        if head_weights is None or table is None:
            return None
        every = [plan.layer_args(i, layer) for i, layer in enumerate(mods["layers"])]
        if len(every) != plan.layers or any(args is None for args in every):
            return None
        program = object.__new__(cls)
        program.stamp, program.model = stamp, weakref.ref(model)  # (the model holds the plan that holds this)
        program.table, program.head, program.rope = table, head_weights, rope
        program.weights, program.layer_meta, program.eps = _flat(every)
        program.norm, program.norm_eps, program.dtype = norm.weight, norm.eps, torch.bfloat16
        program.meta = {}  # first cache row -> meta, as decode_layers takes it
        return program


def _table(embed: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(table, scale) of an embedding smoe::decode_step reads: bf16 [V, H] (an nn.Embedding), or a
    GGMLEmbedding's blocks with their type id; None for any other."""
    if type(embed) is nn.Embedding:
        table = embed.weight
        ok = table.dtype == torch.bfloat16 and embed.max_norm is None
        scale = _NO_SCALE
    elif type(embed) is GGMLEmbedding:
        table = embed.blocks
        ok = embed.dtype == torch.bfloat16 and embed.kind in TYPE_IDS
        scale = torch.tensor([TYPE_IDS.get(embed.kind, -1)], dtype=torch.int32)
    else:
        return None
    return (table, scale) if ok and table.is_contiguous() and table.device.type == "cpu" else None


def _flat(every: list[tuple[list, list, float]]) -> tuple[list[torch.Tensor], list[list[int]], list[float]]:
    """Each layer's layer_args as decode_layers takes them: all weights in one list, the layers'
    sizes, their epsilons."""
    return [t for args in every for t in args[0]], [args[1] for args in every], [args[2] for args in every]


def _meta(layer_meta: list[list[int]], pairs: bool, row0: int) -> list[int]:
    """decode_layers' sizes: each layer's [Q, G, top-k, layer], the rotary layout (1: adjacent
    pairs, RotaryEmbedding.pairs) and the step's first cache row."""
    return [m for layer in layer_meta for m in (*layer, int(pairs), row0)]


def plan_decode(model: nn.Module) -> int:
    """Give the model a DecodePlan when the kernels run here and some Block's parts are all ones
    smoe::decode_layer reads (their decode tensors then packed into one huge-page region each),
    and the final norm a NativeRMSNorm; returns how many layers the plan covers."""
    layers = getattr(model, "layers", None)
    if not available() or layers is None or not hasattr(model, "decode_plan") or model.dtype != torch.bfloat16:
        return 0  # (an fp32 model: the native kernels take only its GGUF blocks, one op at a time)
    count = 0
    for layer in layers:
        if decode_weights(layer) is not None:
            if not any(getattr(module, "in_place", False) for module, _ in decode_tensor_owners(layer)):
                _gather_in_huge_pages(layer)  # (a GGUF file's blocks stay the file's: no copy)
            count += 1
    if count:
        model.decode_plan = DecodePlan(len(layers))
        if type(model.norm) is RMSNorm and model.norm.weight.dtype == torch.bfloat16:
            model.norm = NativeRMSNorm.from_norm(model.norm)
    return count
