"""Preallocated KV cache, with a rolling buffer when the model has a sliding window.

Shapes: L layers, B rows (sequences), G kv heads, S slots, D head dim, T new tokens.

Every row keeps its own positions, so rows can hold prompts of different lengths and a
scheduler can start a new sequence in a freed row between decode steps.

Without a sliding window, S = max_len and position p is stored in slot p.

With a sliding window W < max_len, S = W and position p is stored in slot p % W.
A query at position p attends to positions p-W+1 .. p (W keys, itself included), so
writing p over p-W never loses a key someone still needs. Worked example, W = 4:

    positions written : 0 1 2 3 | 4 5 6 7 | 8 9
    slot (p % 4)      : 0 1 2 3 | 0 1 2 3 | 0 1
    after position 9  : slot 0 -> 8, slot 1 -> 9, slot 2 -> 6, slot 3 -> 7
    query 9 attends   : 6 7 8 9   (9 - 6 = 3 < W)

Decoding one token therefore writes first and then attends over the S slots. A chunk
of T > 1 new tokens in a rolling buffer would overwrite keys that its own first
queries still need, so for chunks the layer attends over [old slots, new keys] and only
then writes the new keys (the last S of them) into their slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smoe.config import ModelConfig
from smoe.fsutil import huge_page_empty


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where a query at q_pos may attend a key at k_pos (broadcast shapes): the key is
    filled (>= 0), not in the future, and inside the sliding window when there is one."""
    mask = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        mask &= q_pos - k_pos < window
    return mask


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed cache tensor; on the CPU in huge pages (fsutil.huge_page_empty), where a decode
    step's attention streams each head's keys and values."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return huge_page_empty(math.prod(shape) * dtype.itemsize).view(dtype).view(shape).zero_()


@dataclass
class AttentionPlan:
    """Decided once per forward pass, shared by every layer."""

    rows: slice
    write_slots: torch.Tensor  # [B, T'] slots the new keys go to (T' = min(T, S) in a rolling buffer)
    concat: bool  # attend over [old slots, new keys] (rolling buffer, T > 1)
    kv_len: int  # slots to attend over when not concat
    mask: torch.Tensor | None  # [B, 1, T, keys] True = may attend; None = attend to all keys
    is_causal: bool = False  # no mask: keys are exactly positions 0..T-1 of a fresh prompt
    static: bool = False  # shapes independent of the positions' values (see KVCache.static)


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.window = config.sliding_window
        self.rolling = self.window is not None and self.window < max_len
        self.num_slots = self.window if self.rolling else max_len
        self.max_len = max_len
        self.batch_size = batch_size
        shape = (
            config.num_hidden_layers, batch_size, config.num_key_value_heads,
            self.num_slots, config.head_dim,
        )
        self.k = _zeros(shape, dtype, device)  # [L, B, G, S, D]
        self.v = _zeros(shape, dtype, device)
        self.slot_pos = torch.full((batch_size, self.num_slots), -1, dtype=torch.long, device=device)
        # the same memory as a NumPy array on the CPU: a batch-1 step writes its slot's position
        # there (a tensor's item assignment is a dispatcher call: ~20 us a step with cold caches)
        self._slot_pos_np = self.slot_pos.numpy() if self.slot_pos.device.type == "cpu" else None
        self.rows = slice(0, batch_size)
        self.plan: AttentionPlan | None = None
        self._slot_ids: dict[int, torch.Tensor] = {}  # slot -> [[slot]], the write index of a batch-1 step
        # Static one-token steps: plan without reading positions on the host — attend over all
        # S slots under a mask, write with scatter — so a decode step has one shape whatever
        # the context length, and can be compiled whole (generate.py, compile=True).
        self.static = False

    def view(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop-1 that shares this cache's storage."""
        sub = object.__new__(KVCache)
        sub.__dict__.update(self.__dict__)
        sub.rows = slice(start, stop)
        sub.plan = None
        return sub

    def reset(self) -> None:
        """Forget the contents of this view's rows (the storage is reused as it is)."""
        self.slot_pos[self.rows] = -1

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def begin(self, positions: torch.Tensor) -> AttentionPlan:
        """Plan one forward pass over new tokens at `positions` [B, T]."""
        B, T = positions.shape
        if B != self.rows.stop - self.rows.start:
            raise ValueError(f"batch of {B} rows does not match the cache view of rows {self.rows}")
        if B == 1 and T == 1 and not self.static:
            return self.begin_one(int(positions))
        slot_pos = self.slot_pos[self.rows]  # [B, S] view
        if self.static and T == 1:
            write_slots = positions % self.num_slots  # [B, 1]
            slot_pos.scatter_(1, write_slots, positions)
            mask = attention_mask(positions[:, :, None], slot_pos[:, None, :], self.window)[:, None]  # [B, 1, 1, S]
            self.plan = AttentionPlan(self.rows, write_slots, False, self.num_slots, mask, static=True)
            return self.plan
        concat = self.rolling and T > 1
        write_pos = positions[:, -self.num_slots:] if concat else positions  # [B, T']
        write_slots = write_pos % self.num_slots
        q_pos = positions[:, :, None]  # [B, T, 1]

        if concat:
            key_pos = torch.cat([slot_pos, positions], dim=1)  # [B, S + T]
            kv_len = self.num_slots + T
        else:
            slot_pos.scatter_(1, write_slots, write_pos)
            kv_len = self.num_slots if self.rolling else int(positions.max()) + 1
            key_pos = slot_pos[:, :kv_len]  # [B, kv_len]

        is_causal = False
        if T == 1 and B == 1 and (not self.rolling or int(positions[0, 0]) >= self.num_slots - 1):
            # one sequence, one token, every slot attended filled (a rolling buffer only once it
            # has wrapped: before that its later slots are empty, or hold a previous sequence's keys)
            mask = None
        elif (
            B == 1 and not concat and kv_len == T and int(positions[0, 0]) == 0
            and (self.window is None or self.window >= T)
        ):
            # a fresh prompt in one chunk: plain causal attention, which SDPA runs without a mask
            mask, is_causal = None, True
        else:
            mask = attention_mask(q_pos, key_pos[:, None, :], self.window)[:, None]  # [B, 1, T, keys]

        if concat:
            slot_pos.scatter_(1, write_slots, write_pos)
        self.plan = AttentionPlan(self.rows, write_slots, concat, kv_len, mask, is_causal)
        return self.plan

    def begin_one(self, pos: int) -> AttentionPlan:
        """One sequence, one token (a batch-1 decode step), planned in Python numbers: the new key
        goes to slot p % S, and the step attends the first min(p + 1, S) slots without a mask —
        before a rolling buffer wraps, slots 0..p hold positions 0..p of this sequence (its later
        slots are empty or a previous sequence's, and are not read); after, every slot is in the
        window. The same keys the masked plan lets through, in two ops instead of a dozen."""
        slot = pos % self.num_slots
        if self._slot_pos_np is not None:
            self._slot_pos_np[self.rows.start, slot] = pos
        else:
            self.slot_pos[self.rows.start, slot] = pos
        write_slots = self._slot_ids.get(slot)
        if write_slots is None:
            write_slots = self._slot_ids[slot] = torch.tensor([[slot]], device=self.slot_pos.device)
        self.plan = AttentionPlan(self.rows, write_slots, False, min(pos + 1, self.num_slots), None)
        return self.plan

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values [B, G, T, D]; return the keys/values to attend over."""
        plan = self.plan
        k_cache = self.k[layer, plan.rows]  # [B, G, S, D], a view into the storage
        v_cache = self.v[layer, plan.rows]
        if plan.concat:
            keys = torch.cat([k_cache, k], dim=2)  # [B, G, S + T, D]
            values = torch.cat([v_cache, v], dim=2)
            T_w = plan.write_slots.shape[1]
            self._write(k_cache, v_cache, k[:, :, -T_w:], v[:, :, -T_w:], plan.write_slots)
            return keys, values
        self._write(k_cache, v_cache, k, v, plan.write_slots, plan.static)
        return k_cache[:, :, : plan.kv_len], v_cache[:, :, : plan.kv_len]

    @staticmethod
    def _write(k_cache, v_cache, k, v, slots, static: bool = False) -> None:
        B, G, T, D = k.shape
        if B == 1 and T == 1 and not static:
            k_cache[:, :, slots[0, 0]] = k[:, :, 0]  # the decode case, without building an index
            v_cache[:, :, slots[0, 0]] = v[:, :, 0]
            return
        index = slots[:, None, :, None].expand(B, G, T, D)
        k_cache.scatter_(2, index, k.to(k_cache.dtype))
        v_cache.scatter_(2, index, v.to(v_cache.dtype))
