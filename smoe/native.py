"""smoe's native CPU kernels (smoe/csrc/native.cpp) from Python: the ops, their fake
implementations for torch.compile, and the weight kinds that call them.

The kernels multiply a few token rows (decode) by bf16, int8 or int4 weights with AVX-512
BF16 and VNNI dot products, reading each weight once; int8 and int4 quantize the activations
to 8 bits in blocks of 32 once per call, shared by every expert of the layer. One op,
`smoe::moe_*`, runs all chosen experts of a MoE layer (gate/up, SiLU·up, down, weighted sum).
Many rows (prefill) go to PyTorch's GEMMs, which are faster there. docs/KERNELS.md has the
layouts, the arithmetic and the measurements.

`available()` is true when the extension was built (`make install`), the CPU has the
instructions and SMOE_NATIVE is not 0. Otherwise the inference layout is PyTorch's (oneDNN-
packed bf16, PyTorch's weight-only int8/int4 kernels) and `note_fallback()` says so once.

The layouts: bf16 weights stay as stored ([N, K], stacked [E, N, K]); int8 keeps its codes
and takes fp32 scales; int4 is repacked at load into blocks of 32 columns, 16 bytes each
(column j in the low nibble, j + 16 in the high one) with a bf16 scale s and offset m per
group (w = code·s + m), so a block unpacks with one shift and one mask.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from smoe.experts import StackedExperts
from smoe.fsutil import huge_page_copy, huge_page_pack, release_module_pages
from smoe.model import Attention, Block, MoE, RMSNorm, Router, Transformer
from smoe.quantize import Int4Linear, Int8Linear, blockwise_linear, int8_linear

MAX_ROWS = 16  # token rows up to which the native kernels run; above, PyTorch's GEMMs

try:
    from smoe import _native
except ImportError as error:  # not built: no compiler, or installed without torch at build time
    _native, _IMPORT_ERROR = None, str(error)
else:
    _IMPORT_ERROR = None

_noted = False


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here, or None when they can."""
    if _native is None:
        return f"the native extension is not built ({_IMPORT_ERROR}); `make install` builds it"
    if os.environ.get("SMOE_NATIVE", "1") == "0":
        return "SMOE_NATIVE=0"
    if not _native.supported():
        return "this CPU lacks AVX-512 BF16 and VNNI"
    return None


def available() -> bool:
    return unavailable_reason() is None


def note_fallback() -> None:
    """Say once per process that the PyTorch kernels run instead, and why."""
    global _noted
    reason = unavailable_reason()
    if reason is not None and not _noted:
        _noted = True
        print(f"smoe: native CPU kernels off ({reason}); using PyTorch's kernels", file=sys.stderr)


def usable_for(weight: torch.Tensor) -> bool:
    """A weight the native kernels can read: on the CPU, with bf16 activations."""
    return weight.device.type == "cpu" and available()


def few_rows(x: torch.Tensor) -> bool:
    return x.shape[0] <= MAX_ROWS and x.dtype == torch.bfloat16 and not x.requires_grad


if _native is not None:  # fake implementations: shapes only, for torch.compile and meta tensors
    def _rows_by(x, out_features):
        return x.new_empty(x.shape[0], out_features)

    torch.library.register_fake("smoe::linear_bf16")(lambda x, w: _rows_by(x, w.shape[0]))
    torch.library.register_fake("smoe::linear_q8")(lambda x, w, scale: _rows_by(x, w.shape[0]))
    torch.library.register_fake("smoe::linear_q4")(lambda x, codes, sm, group_size: _rows_by(x, codes.shape[0]))
    torch.library.register_fake("smoe::moe_bf16")(lambda x, i, w, gate_up, down: torch.empty_like(x))
    torch.library.register_fake("smoe::moe_q8")(lambda x, i, w, gu, gus, dn, dns: torch.empty_like(x))
    torch.library.register_fake("smoe::moe_q4")(lambda x, i, w, gu, gusm, dn, dnsm, g: torch.empty_like(x))
    torch.library.register_fake("smoe::quantize_activations")(
        lambda x, group_size: x.new_empty(x.shape, dtype=torch.float32))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


# --------------------------------------------------------------------------- int4 in the kernels' layout


def int4_native_layout(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                       dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] (0..15), scales and mins [N, K/G] (the stored format's w = code·scale + min,
    smoe/quantize.py) -> (bytes [N, K/2]: per block of 32 columns, column j low nibble, j + 16
    high; sm [N, 2, K/G]: scale, then min)."""
    N, K = codes.shape
    blocks = codes.to(torch.uint8).view(N, K // 32, 2, 16)
    packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2)
    return packed.contiguous(), torch.stack([scales, mins], dim=1).to(dtype).contiguous()


def dequantize_int4_native(codes: torch.Tensor, sm: torch.Tensor, group_size: int, dtype: torch.dtype,
                           start: int = 0, stop: int | None = None) -> torch.Tensor:
    """bytes [N, K/2], sm [N, 2, K/G] -> the weight [N, K] (or its rows start:stop) in `dtype`."""
    b = codes[start:stop]
    n, K = b.shape[0], 2 * b.shape[1]
    q = torch.stack([b.view(n, K // 32, 16) & 0x0F, b.view(n, K // 32, 16) >> 4], dim=2).view(n, K // group_size,
                                                                                            group_size)
    s, m = sm[start:stop, 0].to(dtype)[..., None], sm[start:stop, 1].to(dtype)[..., None]  # [n, K/G, 1]
    return (q.to(dtype) * s + m).view(n, K)


# --------------------------------------------------------------------------- single linears (attention, head)


class NativeLinear(nn.Module):
    """A frozen bias-free bf16 linear: the native kernel for few rows, F.linear for many."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # in huge pages (fsutil.huge_page_copy); a head tied to the embedding is tied again by release_mmap
        self.weight = nn.Parameter(huge_page_copy(linear.weight.detach()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if few_rows(rows):
            return torch.ops.smoe.linear_bf16(rows, self.weight).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, native"


class NativeInt8Linear(Int8Linear):
    """An Int8Linear whose few-row products run natively (with an fp32 copy of its scales)."""

    @classmethod
    def from_int8(cls, linear: Int8Linear) -> NativeInt8Linear:
        native = cls(linear.in_features, linear.out_features, linear.scales.dtype, "meta")
        # scales copied too: a view would keep the checkpoint's whole memory map alive
        native.qweight, native.scales = huge_page_copy(linear.qweight), linear.scales.clone()
        native.register_buffer("scales32", linear.scales.float(), persistent=False)
        return native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if few_rows(rows):
            return torch.ops.smoe.linear_q8(rows, self.qweight, self.scales32).view(*x.shape[:-1], self.out_features)
        return int8_linear(x, self.qweight, self.scales)


class NativeInt4Linear(nn.Module):
    """An int4 linear in the kernels' layout (see int4_native_layout)."""

    def __init__(self, codes: torch.Tensor, sm: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.register_buffer("codes", huge_page_copy(codes))
        self.register_buffer("sm", sm)
        self.out_features, self.in_features, self.group_size = codes.shape[0], 2 * codes.shape[1], group_size

    @classmethod
    def from_int4(cls, linear) -> NativeInt4Linear:
        return cls(*int4_native_layout(*linear.codes(), linear.scales.dtype), linear.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if few_rows(rows):
            y = torch.ops.smoe.linear_q4(rows, self.codes, self.sm, self.group_size)
        else:
            y = blockwise_linear(rows, partial(dequantize_int4_native, self.codes, self.sm, self.group_size, x.dtype),
                                 self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                "native")


def native_linears(model: nn.Module) -> int:
    """Swap the frozen bf16 nn.Linear, Int8Linear and Int4Linear modules (attention, output
    head) for their native versions; returns how many were swapped."""
    if not available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            tensor = next(child.parameters(), None) if type(child) is nn.Linear else next(child.buffers(), None)
            if tensor is None or tensor.device.type != "cpu":
                continue
            if type(child) is nn.Linear and child.bias is None and child.weight.dtype == torch.bfloat16:
                native = NativeLinear(child)
            elif type(child) is Int8Linear and child.scales.dtype == torch.bfloat16:
                native = NativeInt8Linear.from_int8(child)
            elif type(child) is Int4Linear and child.scales.dtype == torch.bfloat16:
                native = NativeInt4Linear.from_int4(child)
            else:
                continue
            release_module_pages([child])  # the native copy replaces the file's pages
            setattr(parent, name, native)
            count += 1
    return count


# --------------------------------------------------------------------------- stacked experts


class NativeStackedLinear(nn.Module):
    """E bf16 linears [E, out, in] (as StackedLinear) with the native decode kernels."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if few_rows(x):
            return torch.ops.smoe.linear_bf16(x.contiguous(), self.weight[e])
        return F.linear(x, self.weight[e])

    def native_moe(self, down: NativeStackedLinear, x, expert_indices, expert_weights) -> torch.Tensor:
        return torch.ops.smoe.moe_bf16(x.contiguous(), expert_indices.contiguous(), expert_weights.contiguous(),
                                       self.weight, down.weight)

    def extra_repr(self) -> str:
        E, out_features, in_features = self.weight.shape
        return f"experts={E}, in_features={in_features}, out_features={out_features}, native"


class NativeStackedInt8(nn.Module):
    """E int8 linears: qweight [E, N, K], scales [E, N] (compute dtype) and their fp32 copy."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("scales32", scales.float(), persistent=False)

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if few_rows(x):
            return torch.ops.smoe.linear_q8(x.contiguous(), self.qweight[e], self.scales32[e])
        return int8_linear(x, self.qweight[e], self.scales[e])

    def native_moe(self, down: NativeStackedInt8, x, expert_indices, expert_weights) -> torch.Tensor:
        return torch.ops.smoe.moe_q8(x.contiguous(), expert_indices.contiguous(), expert_weights.contiguous(),
                                     self.qweight, self.scales32, down.qweight, down.scales32)


class NativeStackedInt4(nn.Module):
    """E int4 linears in the kernels' layout: codes [E, N, K/2], sm [E, N, 2, K/G]."""

    def __init__(self, codes: torch.Tensor, sm: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("sm", sm)
        self.group_size = group_size
        self.out_features, self.in_features = codes.shape[1], 2 * codes.shape[2]

    @property
    def num_experts(self) -> int:
        return self.codes.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if few_rows(x):
            return torch.ops.smoe.linear_q4(x.contiguous(), self.codes[e], self.sm[e], self.group_size)
        dequantize = partial(dequantize_int4_native, self.codes[e], self.sm[e], self.group_size, x.dtype)
        return blockwise_linear(x.contiguous(), dequantize, self.out_features)

    def native_moe(self, down: NativeStackedInt4, x, expert_indices, expert_weights) -> torch.Tensor:
        return torch.ops.smoe.moe_q4(x.contiguous(), expert_indices.contiguous(), expert_weights.contiguous(),
                                     self.codes, self.sm, down.codes, down.sm, self.group_size)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, native")


def stack_bf16(rows: list[list[nn.Linear]]) -> NativeStackedLinear | None:
    """The native stacked kind for bf16 experts, or None where the kernels cannot read them."""
    weight = rows[0][0].weight
    if weight.dtype != torch.bfloat16 or not usable_for(weight):
        return None
    return NativeStackedLinear(huge_page_copy(torch.stack([torch.cat([lin.weight.detach() for lin in row])
                                                           for row in rows])))


def stack_int8(rows: list[list[nn.Module]]) -> NativeStackedInt8 | None:
    first = rows[0][0]
    if first.scales.dtype != torch.bfloat16 or not usable_for(first.qweight):
        return None
    return NativeStackedInt8(huge_page_copy(torch.stack([torch.cat([lin.qweight for lin in row]) for row in rows])),
                             torch.stack([torch.cat([lin.scales for lin in row]) for row in rows]))


def stack_int4(rows: list[list[nn.Module]]) -> NativeStackedInt4 | None:
    first = rows[0][0]
    if first.scales.dtype != torch.bfloat16 or not usable_for(first.qweight):
        return None
    codes, sms = [], []
    for row in rows:
        parts = [lin.codes() for lin in row]
        c, sm = int4_native_layout(*(torch.cat(p) for p in zip(*parts, strict=True)))
        codes.append(c)
        sms.append(sm)
    return NativeStackedInt4(huge_page_copy(torch.stack(codes)), torch.stack(sms), first.group_size)


# --------------------------------------------------------------------------- a whole decoder layer per call

_NO_SCALE = torch.empty(0)


# the tensors smoe::decode_layer reads from each native kind: (weight, scale); bf16 has no scale
_LINEAR_WEIGHTS = {NativeLinear: ("weight", None), NativeInt8Linear: ("qweight", "scales32"),
                   NativeInt4Linear: ("codes", "sm")}
_STACKED_WEIGHTS = {NativeStackedLinear: ("weight", None), NativeStackedInt8: ("qweight", "scales32"),
                    NativeStackedInt4: ("codes", "sm")}


def _kernel_weights(module: nn.Module, kinds: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, scale) of a module of one of `kinds` as smoe::decode_layer reads it, or None."""
    names = kinds.get(type(module))
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
    if not (type(attn) is Attention and type(moe) is MoE and type(moe.router) is Router
            and type(block.attn_norm) is RMSNorm and type(block.ffn_norm) is RMSNorm
            and type(moe.experts) is StackedExperts and moe.experts.path == "auto"
            and block.attn_norm.eps == block.ffn_norm.eps):
        return None
    small = [block.attn_norm.weight, block.ffn_norm.weight, moe.router.weight]
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() for t in small):
        return None
    pairs = [_kernel_weights(lin, _LINEAR_WEIGHTS) for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
    pairs += [_kernel_weights(stacked, _STACKED_WEIGHTS) for stacked in (moe.experts.gate_up, moe.experts.down)]
    if any(p is None for p in pairs):
        return None
    return [t.detach() for t in small] + [t for pair in pairs for t in pair]


def _hook_dicts(modules: tuple[nn.Module, ...]) -> tuple[dict, ...]:
    """The dicts a forward hook on any of `modules` would be in (torch's own, global ones first):
    any() of them is whether something hooks them."""
    from torch.nn.modules import module as m

    return (m._global_forward_hooks, m._global_forward_pre_hooks,
            *(d for mod in modules for d in (mod._forward_hooks, mod._forward_pre_hooks)))


def _decode_tensor_owners(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every tensor smoe::decode_layer reads from this Block, in the order
    one step reads them: the attention norm, q/k/v's weights one after another (then their
    scales), o, the experts' norm, the router, the experts'."""
    attn, moe = block.attn, block.moe
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    owners = [(block.attn_norm, "weight")]
    owners += [(lin, _LINEAR_WEIGHTS[type(lin)][0]) for lin in projections]
    owners += [(lin, _LINEAR_WEIGHTS[type(lin)][1]) for lin in projections]
    owners += [(attn.o_proj, name) for name in _LINEAR_WEIGHTS[type(attn.o_proj)]]
    owners += [(block.ffn_norm, "weight"), (moe.router, "weight")]
    for stacked in (moe.experts.gate_up, moe.experts.down):
        owners += [(stacked, name) for name in _STACKED_WEIGHTS[type(stacked)]]
    return [(module, name) for module, name in owners if name is not None]


def _pack_in_huge_pages(block: nn.Module) -> None:
    """Move the tensors a decode step reads from this Block into one huge-page region
    (fsutil.huge_page_pack), in the order they are read: the attention weights (0.5 MiB each
    at hidden 1024) are too small for a huge page of their own, and on 4 KiB pages the kernels
    read them at ~20 GB/s where they read huge pages at ~26 (docs/KERNELS.md)."""
    owners = _decode_tensor_owners(block)
    tensors = [getattr(module, name).detach() for module, name in owners]
    for (module, name), copy in zip(owners, huge_page_pack(tensors), strict=True):
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(copy, requires_grad=module._parameters[name].requires_grad)
        else:
            module._buffers[name] = copy


def native_blocks(model: nn.Module) -> int:
    """Turn every Block whose parts the kernels all read into a NativeBlock, and the model into a
    NativeTransformer (a decode step's layers in one call) when it has any; returns how many."""
    if not available():
        return 0
    count = 0
    for layer in getattr(model, "layers", []):
        if type(layer) is Block and decode_weights(layer) is not None:
            layer.__class__ = NativeBlock
            _pack_in_huge_pages(layer)
            count += 1
    if count and type(model) is Transformer:
        model.__class__ = NativeTransformer
        if type(model.norm) is RMSNorm and model.norm.weight.dtype == torch.bfloat16:
            model.norm.__class__ = NativeRMSNorm
    return count


class NativeRMSNorm(RMSNorm):
    """The model's final RMSNorm, as smoe::rms_norm (decode_layer's arithmetic) for a decode
    step's few bf16 rows: one call instead of six PyTorch ops; anything else runs the module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.numel() > MAX_ROWS * x.shape[-1]
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or torch.compiler.is_compiling()):
            return super().forward(x)
        return torch.ops.smoe.rms_norm(x.contiguous(), self.weight, self.eps)


def _decode_step(x: torch.Tensor, ctx) -> tuple | None:
    """What every layer of a decode step shares (slots, mask, kv_len, cos, sin), made once per
    step, or None where the step is not one smoe::decode_layer computes."""
    B, T, _ = x.shape
    cache = ctx.cache
    if (T != 1 or cache is None or cache.plan.static or B > MAX_ROWS or x.dtype != torch.bfloat16
            or x.requires_grad or torch.compiler.is_compiling()):
        return None
    step = getattr(ctx, "native_step", None)
    if step is None:  # the op reads these as flat rows: [B] slots, [B, kv_len] mask, [B, D] cos / sin
        plan = cache.plan
        mask = None if plan.mask is None else _dense(plan.mask)
        step = ctx.native_step = (_dense(plan.write_slots), mask, plan.kv_len, _dense(ctx.cos), _dense(ctx.sin))
    return step


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its elements are already one dense run (the op checks only that and the
    count): a reshape or contiguous() is a dispatcher call, and Python between decode steps
    runs with caches the weights have just flushed."""
    return t if t.is_contiguous() else t.contiguous()


class NativeBlock(Block):
    """A Block whose decode steps — one new token per row over a KV cache, bf16, at most
    MAX_ROWS rows, no hooks on it or its parts — run as one call of smoe::decode_layer (RMSNorm,
    q/k/v, RoPE, cache write, attention, o, router, the fused experts, both residuals);
    every other call (prefill, training, hooks, a compiled step) runs the modules."""

    _decode_parts: tuple | None = None
    _decode_weights: list | None = None
    _decode_meta: list | None = None
    _decode_hooks: tuple = ()

    def decode_args(self) -> tuple[list, list, float] | None:
        """(weights, [Q, G, top-k, layer], eps) for smoe::decode_layer, or None where a part was
        swapped for one the op does not compute or anything hooks this Block or its parts."""
        parts = _parts(self)
        if parts != self._decode_parts:  # a part was swapped since: read the weights again
            self._decode_parts, self._decode_weights = parts, decode_weights(self)
            attn = self.attn
            self._decode_meta = [attn.n_heads, attn.n_kv_heads, self.moe.router.top_k, attn.layer_idx]
            self._decode_hooks = _hook_dicts((self, *parts))
        if self._decode_weights is None or any(self._decode_hooks):
            return None
        return self._decode_weights, self._decode_meta, parts[0].eps

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        step = _decode_step(x, ctx)
        args = None if step is None else self.decode_args()
        if args is None:
            return super().forward(x, ctx)
        weights, meta, eps = args
        B, _, H = x.shape
        slots, mask, kv_len, cos, sin = step
        cache = ctx.cache
        y = torch.ops.smoe.decode_layer(x.view(B, H), weights, meta + [cache.plan.rows.start], eps, cache.k, cache.v,
                                        slots, mask, kv_len, cos, sin)
        return y.view(B, 1, H)


class NativeTransformer(Transformer):
    """A Transformer whose decode steps run all their layers in one call of smoe::decode_layers
    when every layer is a NativeBlock that would take the native path; otherwise layer by layer
    (each NativeBlock still deciding for itself)."""

    def run_layers(self, x: torch.Tensor, ctx) -> torch.Tensor:
        step = _decode_step(x, ctx)
        if step is None or (self.gradient_checkpointing and self.training):
            return super().run_layers(x, ctx)
        weights, meta, eps = [], [], []
        row0 = ctx.cache.plan.rows.start
        for layer in self.layers:
            args = layer.decode_args() if type(layer) is NativeBlock else None
            if args is None:
                return super().run_layers(x, ctx)
            weights += args[0]
            meta += args[1]
            meta.append(row0)
            eps.append(args[2])
        B, _, H = x.shape
        slots, mask, kv_len, cos, sin = step
        cache = ctx.cache
        y = torch.ops.smoe.decode_layers(x.view(B, H), weights, meta, eps, cache.k, cache.v, slots, mask, kv_len,
                                         cos, sin)
        return y.view(B, 1, H)


if _native is not None:
    torch.library.register_fake("smoe::decode_layer")(
        lambda x, weights, meta, eps, k_all, v_all, slots, mask, kv_len, cos, sin: torch.empty_like(x))
    torch.library.register_fake("smoe::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake("smoe::decode_layers")(
        lambda x, weights, meta, eps, k_all, v_all, slots, mask, kv_len, cos, sin: torch.empty_like(x))
