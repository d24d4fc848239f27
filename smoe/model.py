"""The Mixtral architecture as one readable nn.Module tree.

Shape legend: B batch, T tokens, N = B*T token rows, H hidden, E experts, K experts per
token (top-k), F expert hidden, Q query heads, G kv heads, D head dim, V vocab, S cache slots.

    tokens -> embed -> L x Block -> RMSNorm -> lm_head -> logits
    Block:  x = x + Attention(RMSNorm(x))      grouped-query attention, RoPE, optional sliding window
            x = x + MoE(RMSNorm(x))            router -> top-k -> renormalise -> experts -> weighted sum

Quantization, LoRA, offloading and parallelism are transforms that swap modules of this
tree after it is built (DESIGN.md, "One model, many transforms"; the order is in
smoe/loader.py); nothing here knows about them. The experts and their implementations
live in smoe/experts.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from smoe.cache import KVCache, attention_mask
from smoe.config import ModelConfig
from smoe.experts import Expert, ExpertList


def _building_on_meta() -> bool:
    """Whether new tensors land on meta (a `with torch.device("meta")` around construction)."""
    return torch.empty(0).is_meta


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like the reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) in the 'rotate half' layout used by Hugging Face checkpoints:
    dimension i pairs with i + D/2 (Mistral's consolidated files pair 2i with 2i+1; the
    checkpoint loader permutes their q/k rows into this layout). `pairs = True`: the tables for
    adjacent pairs (2i, 2i+1) instead — llama.cpp's layout, in which a GGUF file used in place
    keeps its q/k rows (apply_rotary with pairs=True: the same products with the head's dimensions
    in another order, so the attention scores sum the same terms)."""

    pairs = False

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # on meta (the loader builds there, then reset_parameters): arange's meta version imports
        # sympy (+70 MiB resident) for a table nobody reads
        inv_freq = torch.empty(head_dim // 2) if _building_on_meta() else self._inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._memo: dict = {}  # one position's tables (a decode step of one row), see forward

    def _inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)  # [D/2]

    def reset_parameters(self, device=None) -> None:
        self.inv_freq = self._inv_freq(device)
        self._memo.clear()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # A one-row decode step's tables are kept per position: six small ops per step otherwise,
        # run with caches a native step's weights have just flushed. Only under inference mode (the
        # tensors are inference tensors) and on the CPU (reading the position would sync a GPU).
        if (not torch.compiler.is_compiling()  # first: dynamo cannot trace is_inference_mode_enabled
                and positions.numel() == 1 and positions.device.type == "cpu" and torch.is_inference_mode_enabled()):
            return self.at(int(positions), dtype, tuple(positions.shape))
        return self._tables(positions, dtype)

    def at(self, position: int, dtype: torch.dtype,
           shape: tuple[int, ...] = (1, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of one position (positions of `shape`, one element), kept: a one-row decode
        step's (on the CPU, under inference mode). Made 64 positions at a time — the next steps'
        — so that a generation pays for its tables once every 64 tokens, not every token."""
        inv_freq = self._buffers["inv_freq"]
        key = (position, shape, dtype, inv_freq.dtype, inv_freq.device, self.pairs)
        tables = self._memo.get(key)
        if tables is None:
            if len(self._memo) >= 8192:
                self._memo.clear()
            block = 64
            positions = torch.arange(position, position + block, device=inv_freq.device).view(block, *shape[1:])
            cos, sin = self._tables(positions, dtype)
            for i in range(block):
                self._memo[(position + i, *key[1:])] = cos[i : i + 1], sin[i : i + 1]
            tables = self._memo[key]
        return tables

    def _tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        angles = freqs.repeat_interleave(2, dim=-1) if self.pairs else torch.cat([freqs, freqs], dim=-1)  # [B, T, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, 1, T, D]. Dimension i rotates with i + D/2, or with its
    neighbour in (2i, 2i+1) with pairs (tables made by RotaryEmbedding with pairs = True)."""
    if pairs:
        rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares: rotary tables, mask, cache."""

    cos: torch.Tensor  # [B, 1, T, D]
    sin: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, T, keys], True = may attend
    is_causal: bool  # no mask needed beyond plain causality (uncached, no window in reach)
    cache: KVCache | None
    pairs: bool = False  # RoPE over adjacent pairs (the tables' layout: RotaryEmbedding.pairs)


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row (a decode step): q [B, Q, 1, D] over the cache's
    k, v [B, G, S, D], mask [B, 1, 1, S] (True = may attend) or None -> [B, Q, 1, D].

    softmax(q·kᵀ/√D)·v written out, in fp32, with the Q/G query heads of each kv head as the rows
    of one product ([B, G, Q/G, D] x [B, G, D, S]), which is how grouped-query attention shares
    its keys. With a single query row per head there is too little work for SDPA's blocked
    kernel to pay off: this is 4-6x faster at 16 rows and the same at one. Every decode step
    takes this path, whatever its number of rows, so a sequence decodes the same alone or batched."""
    B, Q, _, D = q.shape
    G, S = k.shape[1], k.shape[2]
    queries = q.reshape(B, G, Q // G, D).float()  # [B, G, Q/G, D]: head h reads kv head h // (Q/G)
    scores = queries @ k.float().transpose(-1, -2) * D**-0.5  # [B, G, Q/G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(B, 1, 1, S), float("-inf"))
    out = scores.softmax(-1) @ v.float()  # [B, G, Q/G, D]
    return out.to(q.dtype).reshape(B, Q, 1, D)


class Attention(nn.Module):
    """Grouped-query attention: Q query heads share G kv heads (Q/G queries per kv head)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        H, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Q, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, G, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, G, T, D]
        q = apply_rotary(q, ctx.cos, ctx.sin, ctx.pairs)
        k = apply_rotary(k, ctx.cos, ctx.sin, ctx.pairs)
        out = self.attend(q, k, v, ctx)  # [B, Q, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The new keys and values into the cache (if any), then q [B, Q, T, D] attends -> [B, Q, T, D]."""
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)  # [B, G, keys, D]
        if q.shape[2] == 1 and ctx.cache is not None:
            return one_token_attention(q, k, v, ctx.mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal,
                                              enable_gqa=self.n_heads != self.n_kv_heads)


class HalfCacheAttention(Attention):
    """Attention as llama.cpp computes it over its default F16 KV cache (without flash attention):
    keys and values rounded to fp16 as that cache stores them, the query rounded to fp16 for the
    K·Q product (ggml converts it to the keys' type) and the probabilities for the V product, the
    products and the softmax in fp32. The fp32 model of a GGUF file used in place runs it
    (loader.load_gguf_in_place), so that its arithmetic outside the block products is llama.cpp's
    too: on the demo's files, mean |Δlogit| against llama.cpp 0.022-0.040 -> 0.019-0.025, about what
    a one-ulp change of the embedding makes (docs/FORMATS.md). The cache keeps the model's dtype; it
    holds fp16 values. A long prompt's queries go a block of rows at a time, its scores at most
    `scores_bytes`."""

    scores_bytes = 64 << 20

    @staticmethod
    def of(attn: Attention) -> HalfCacheAttention:
        """`attn` (its projections, sizes and hooks as they are) computing as this class does."""
        half = HalfCacheAttention.__new__(HalfCacheAttention)
        half.__dict__.update(attn.__dict__)
        return half

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        k, v = (t.to(torch.float16).to(t.dtype) for t in (k, v))
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)  # [B, G, keys, D]
        B, Q, T, D = q.shape
        G, S = k.shape[1], k.shape[2]
        allowed = ctx.mask  # [B, 1, T, S] or None
        if allowed is None and ctx.is_causal:
            allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        keys, values = k.float().transpose(-1, -2), v.float()
        out = torch.empty(B, Q, T, D, dtype=q.dtype, device=q.device)
        step = max(1, self.scores_bytes // (4 * B * Q * S))  # query rows at a time: bounded scores
        for t0 in range(0, T, step):
            n = min(step, T - t0)
            rows = q[:, :, t0 : t0 + n].to(torch.float16).float().reshape(B, G, Q // G * n, D)  # head h: kv h // (Q/G)
            scores = (rows @ keys).view(B, Q, n, S) * D**-0.5
            if allowed is not None:
                scores = scores.masked_fill(~allowed[..., t0 : t0 + n, :], float("-inf"))
            probs = scores.softmax(-1).to(torch.float16).float().view(B, G, Q // G * n, S)
            out[:, :, t0 : t0 + n] = (probs @ values).view(B, Q, n, D)
        return out


class Router(nn.Module):
    """softmax(x·Wgᵀ) in fp32 -> top-k -> renormalise, as Mixtral's checkpoints expect."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> router_logits [N, E], expert_weights [N, K] (fp32), expert_indices [N, K]."""
        return self.route(F.linear(x, self.weight))

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """router_logits [N, E] -> (router_logits, expert_weights [N, K], expert_indices [N, K])."""
        probs = torch.softmax(router_logits.float(), dim=-1)  # [N, E]
        expert_weights, expert_indices = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        return router_logits, expert_weights, expert_indices


class MoE(nn.Module):
    """Sparse mixture of experts: router -> top-k -> renormalise -> experts -> weighted sum.

    The experts are one module called as experts(x [N, H], expert_indices [N, K],
    expert_weights [N, K]) -> [N, H] (smoe/experts.py); whoever wants to see the routing
    hooks the router (smoe/routing.py, observe_routing)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = ExpertList(
            Expert(config.hidden_size, config.intermediate_size) for _ in range(config.num_local_experts)
        )
        self.jitter_noise = config.router_jitter_noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        x = x.reshape(B * T, H)  # [N, H]
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        router_logits, expert_weights, expert_indices = self.router(x)  # [N, E], [N, K], [N, K]
        return self.experts(x, expert_indices, expert_weights).view(B, T, H)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = MoE(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.moe(self.ffn_norm(x))


def _embedding(vocab: int, hidden: int) -> nn.Embedding:
    """nn.Embedding(vocab, hidden); built on meta (as the loader builds) without its normal_ init,
    whose meta version imports torch._dynamo — +70 MiB resident and ~1 s — to fill values nobody reads."""
    if _building_on_meta():
        return nn.Embedding(vocab, hidden, _weight=torch.empty(vocab, hidden))
    return nn.Embedding(vocab, hidden)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        # recompute each block's activations in backward instead of keeping them (training only)
        self.gradient_checkpointing = False
        self.decode_plan = None  # a backend's plan for decode steps, attached at load (smoe/kernels/)

    @property
    def dtype(self) -> torch.dtype:
        embed = self.embed_tokens  # an nn.Embedding, or a table kept in a block format (smoe/ggml.py)
        return embed.weight.dtype if isinstance(embed, nn.Embedding) else embed.dtype

    @property
    def device(self) -> torch.device:
        embed = self.embed_tokens
        return embed.weight.device if isinstance(embed, nn.Embedding) else embed.device

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation for training from scratch (normal(0, std), norms at 1)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ([B, 1, V] with last_only).

        Without a cache this is the plain full-sequence forward (positions 0..T-1).
        With a cache, `positions` [B, T] are the absolute positions of the new tokens.
        """
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(positions, self.dtype)  # [B, T, D]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]

        if cache is not None:
            plan = cache.begin(positions)
            mask, is_causal = plan.mask, plan.is_causal
        else:
            window = self.config.sliding_window
            if window is None or window >= T:
                mask, is_causal = None, True
            else:
                pos = torch.arange(T, device=input_ids.device)
                mask, is_causal = attention_mask(pos[:, None], pos[None, :], window)[None, None], False  # [1, 1, T, T]
        ctx = ForwardContext(cos, sin, mask, is_causal, cache, self.rope.pairs)

        x = self.run_layers(self.embed_tokens(input_ids), ctx)  # [B, T, H]
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # [B, T, V]

    def decode_step(self, tokens: list[int], positions: list[int], cache: KVCache
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A decode step (token ids `tokens` at `positions`, one per row of the cache view) as the
        decode plan's one native call, from Python numbers: (logits [B, V], each row's greedy
        token [B]) — forward's logits to the bit — or None where the plan does not take this step
        (no plan, something hooked or swapped, a compiled or static cache); then call forward."""
        plan = self.decode_plan
        return None if plan is None else plan.step(self, tokens, positions, cache)

    def run_layers(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The decoder layers in order, x [B, T, H] -> [B, T, H]. A decode-step plan the loader
        attached (smoe/kernels/decode.py) runs the steps it takes — one new token per row over a
        cache — in native calls instead; it gives None for any other call."""
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if self.decode_plan is not None and not checkpointing:
            y = self.decode_plan(self.layers, x, ctx)
            if y is not None:
                return y
        for layer in self.layers:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return x
