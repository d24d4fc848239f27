"""Expert offloading: run a model whose experts do not all fit in memory.

A sparse MoE computes like a small model but must hold every expert: Mixtral-8x7B reads
~13 B parameters per token out of 47 B. Offloading keeps the attention, embeddings, norms
and routers resident and treats the experts as a store with tiers:

    disk (the checkpoint's memory map) -> RAM cache -> GPU cache (when the model is on a GPU)

Each cache holds whole experts under a byte budget (`max_memory`); a miss reads the expert
from the tier below. Eviction is LRU (least recently used) by default, or LFU (least
frequently used); a usage profile (`smoe profile`) can pin the experts a workload uses most,
so they are loaded once and never evicted.

Prefetch (the speculative loading of Eliseev & Mazur 2023, "Fast inference of
mixture-of-experts language models with offloading"): consecutive layers change the hidden
state little, so layer L+1's router applied to layer L's hidden state guesses L+1's experts
well. While layer L's experts compute, a background thread loads the guessed experts.

It is a transform (DESIGN.md): `offload_experts` swaps each MoE layer's experts for an
`OffloadedExperts` with the same call (smoe/experts.py). Later transforms reach it through
the same two methods as any experts module: `map_experts` (quantization) and
`for_inference` (stacking, packing) are recorded and applied to each expert as it loads,
so an offloaded expert goes through exactly what a resident one does and the outputs are
identical. The loader starts the store (`ExpertStore.start`) once every transform is known.
"""

from __future__ import annotations

import copy
import ctypes
import json
import re
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smoe.errors import SmoeError
from smoe.experts import ExpertList, dispatch_sorted
from smoe.fsutil import atomic_write, read_ahead, release_pages, return_freed_memory
from smoe.options import DEFAULT_CACHE_POLICY, OffloadSpec
from smoe.routing import count_experts, observe_routing

PROFILE_FORMAT = "smoe-expert-profile"
Key = tuple[int, int]  # (layer, expert)
PIN_SHARE = 0.5  # of the budget pinned from a profile; the rest stays an LRU cache (pinned_experts)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's tensors (oneDNN-packed weights counted by their element count)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# --------------------------------------------------------------------------- statistics


@dataclass
class TierStats:
    name: str
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


@dataclass
class OffloadStats:
    tiers: list[TierStats]
    disk_bytes: int = 0  # read from the checkpoint files
    disk_reads: int = 0
    disk_s: float = 0.0
    stall_s: float = 0.0  # the forward pass waiting for an expert to arrive
    prefetch_loads: int = 0  # experts loaded by the prefetcher
    prefetch_used: int = 0  # ... and then asked for by the forward pass
    prefetch_late: int = 0  # ... asked for while still loading (a miss that stalled less)
    prefetch_skipped: int = 0  # guesses with no room to load them into
    guessed: int = 0  # experts the routers chose, for layers that had a guess
    guessed_right: int = 0  # ... that were in the guess

    @property
    def prefetch_accuracy(self) -> float:
        return self.guessed_right / max(1, self.guessed)

    def to_dict(self) -> dict:
        return {
            "tiers": [{"name": t.name, "hits": t.hits, "misses": t.misses, "hit_rate": round(t.hit_rate, 4),
                       "evictions": t.evictions} for t in self.tiers],
            "disk_bytes": self.disk_bytes, "disk_reads": self.disk_reads, "disk_s": round(self.disk_s, 4),
            "stall_s": round(self.stall_s, 4), "prefetch_loads": self.prefetch_loads,
            "prefetch_used": self.prefetch_used, "prefetch_late": self.prefetch_late,
            "prefetch_skipped": self.prefetch_skipped,
            "prefetch_accuracy": round(self.prefetch_accuracy, 4), "guessed": self.guessed,
        }

    def format(self) -> str:
        lines = [f"expert cache {t.name}: {t.hit_rate:.1%} hits ({t.hits} hits, {t.misses} misses, "
                 f"{t.evictions} evictions)" for t in self.tiers]
        rate = self.disk_bytes / self.disk_s / 1e9 if self.disk_s else 0.0
        lines.append(f"read from the checkpoint: {format_bytes(self.disk_bytes)} in {self.disk_reads} loads "
                     f"({self.disk_s:.2f} s, {rate:.2f} GB/s); stalled on loads: {self.stall_s:.2f} s")
        if self.guessed:
            lines.append(f"prefetch: {self.prefetch_accuracy:.1%} of chosen experts guessed; "
                         f"{self.prefetch_loads} loaded, {self.prefetch_used} used "
                         f"({self.prefetch_late} of them still loading when asked for), "
                         f"{self.prefetch_skipped} skipped for lack of room")
        return "\n".join(lines)


# --------------------------------------------------------------------------- one cache tier


class ExpertCache:
    """Whole experts on one device under a byte budget. Not thread-safe: the store locks."""

    def __init__(self, name: str, device: torch.device, budget: int, policy: str = DEFAULT_CACHE_POLICY) -> None:
        self.name, self.device, self.budget, self.policy = name, device, budget, policy
        self.entries: OrderedDict[Key, tuple[nn.Module, int]] = OrderedDict()  # oldest use first
        self.pinned: set[Key] = set()
        self.uses: Counter[Key] = Counter()
        self.used = 0  # bytes held, plus bytes reserved for loads in flight
        self.stats = TierStats(name)

    def get(self, key: Key) -> nn.Module | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        self.uses[key] += 1
        return entry[0]

    def _victim(self, keep: set[Key]) -> Key | None:
        candidates = [k for k in self.entries if k not in self.pinned and k not in keep]  # oldest use first
        if not candidates:
            return None
        if self.policy == "lfu":
            return min(candidates, key=lambda k: self.uses[k])  # min() keeps the first (oldest) of ties
        return candidates[0]

    def make_room(self, nbytes: int, keep: set[Key] = frozenset()) -> bool:
        """Evict until nbytes more fit in the budget; False if that would take an expert in `keep`
        or a pinned one."""
        while self.used + nbytes > self.budget:
            victim = self._victim(keep)
            if victim is None:
                return False
            _, size = self.entries.pop(victim)
            self.used -= size
            self.stats.evictions += 1
        return True

    def put(self, key: Key, module: nn.Module, nbytes: int, reserved: int = 0) -> None:
        """Insert an expert for which `reserved` bytes were set aside (after make_room)."""
        if key in self.entries:
            self.used -= self.entries.pop(key)[1]
        self.used += nbytes - reserved
        self.entries[key] = (module, nbytes)
        self.uses[key] += 1


# --------------------------------------------------------------------------- the store


class ExpertStore:
    """All experts of a model, by (layer, expert): read from the checkpoint's memory map on a
    miss, kept in the tiers' caches, loaded ahead by a background thread on a guess.

    sources: {(layer, expert): {parameter name in the expert module: file view}};
    templates: one expert module per layer on `meta` (the layer's structure: plain, int8, int4);
    steps: per layer, what a resident expert goes through after loading (quantize, stack,
    pack: recorded by OffloadedExperts), applied to a one-expert ExpertList when the expert
    enters the compute tier. tiers: [(name, device, budget)], slowest first; the last one is
    where the experts compute. Nothing is loaded until `start`."""

    def __init__(
        self,
        sources: dict[Key, dict[str, torch.Tensor]],
        templates: list[nn.Module],
        dtype: torch.dtype,
        tiers: list[tuple[str, torch.device | str, int]],
        policy: str = DEFAULT_CACHE_POLICY,
        prefetch: bool = True,
        top_k: int = 2,
    ) -> None:
        self.sources, self.templates, self.dtype, self.top_k = sources, templates, dtype, top_k
        self.steps: dict[int, list[Callable[[nn.Module], nn.Module]]] = {i: [] for i in range(len(templates))}
        self.tiers = [ExpertCache(name, torch.device(device), budget, policy) for name, device, budget in tiers]
        self.compute = self.tiers[-1]
        self.stats = OffloadStats([t.stats for t in self.tiers])
        self._lock = threading.Lock()
        self._pending: dict[Key, Future] = {}
        self._prefetched: set[Key] = set()  # loaded by the prefetcher, not yet asked for
        self._guess: dict[int, set[int]] = {}  # layer -> guessed experts
        self._busy: set[Key] = set()  # experts of the layer now computing: never evicted for a prefetch
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="smoe-prefetch") if prefetch else None
        self.expert_bytes = 0  # measured by start()

    def start(self, pinned: Callable[[ExpertStore], list[Key]] | None = None, progress: bool = False) -> None:
        """Measure an expert as the compute tier holds it, check the budgets, and pin the
        experts `pinned(store)` names; called once every transform has added its step."""
        self.expert_bytes = self._measure()
        for tier in self.tiers:
            if tier.budget < self.expert_bytes:
                raise SmoeError(
                    f"the expert memory budget for {tier.name} ({format_bytes(tier.budget)}) holds no expert: "
                    f"one takes {format_bytes(self.expert_bytes)}; give --max-memory at least that "
                    f"({self.top_k} experts per token and layer, {format_bytes(self.top_k * self.expert_bytes)}, "
                    "or more avoids reloading within a token)")
        if pinned is not None:
            self.pin(pinned(self), progress=progress)

    def prepare(self, layer: int, module: nn.Module) -> nn.Module:
        """An expert as it computes: a one-expert experts module after the layer's steps."""
        experts = ExpertList([module])
        for step in self.steps[layer]:
            experts = step(experts)
        return experts

    def _measure(self) -> int:
        """Bytes one expert takes in the compute tier: load the first one and see."""
        module = self._read((0, 0))
        for i in range(len(self.tiers)):
            module = self._into(i, (0, 0), module)
        self.stats.disk_bytes = self.stats.disk_reads = 0
        self.stats.disk_s = 0.0
        return module_bytes(module)

    # -- loading

    def _read(self, key: Key) -> nn.Module:
        """Disk tier: a fresh expert module holding copies of its weights, in the model dtype."""
        layer, e = key
        t0 = time.perf_counter()
        state, nbytes = {}, 0
        first_tier = self.tiers[0].device
        for view in self.sources[key].values():
            read_ahead(view)
        for name, view in self.sources[key].items():
            dtype = self.dtype if view.is_floating_point() else view.dtype
            t = torch.empty(view.shape, dtype=dtype, device=first_tier)
            if t.dtype == view.dtype and t.device == view.device and view.is_contiguous():
                # one plain memcpy, without the GIL or torch's thread pool: on the prefetch
                # thread, a parallel copy would take the cores from the forward pass
                ctypes.memmove(t.data_ptr(), view.data_ptr(), view.numel() * view.element_size())
            else:
                t.copy_(view)
            nbytes += view.numel() * view.element_size()
            release_pages(view)  # the copy replaces the file pages in our resident set
            state[name] = t
        module = self._build(layer, state)
        with self._lock:
            self.stats.disk_bytes += nbytes
            self.stats.disk_reads += 1
            self.stats.disk_s += time.perf_counter() - t0
        return module

    def _build(self, layer: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """An expert module of `layer`'s structure holding these tensors (no copies)."""
        module = copy.deepcopy(self.templates[layer])  # on meta: structure only
        module.load_state_dict(state, strict=True, assign=True)
        return module.requires_grad_(False)

    def _into(self, index: int, key: Key, module: nn.Module) -> nn.Module:
        """The form an expert takes in tier `index`: on its device (a copy: the tier below keeps
        its own), prepared in the compute tier."""
        tier = self.tiers[index]
        state = module.state_dict()
        if any(t.device != tier.device for t in state.values()):
            module = self._build(key[0], {name: t.to(tier.device, non_blocking=True) for name, t in state.items()})
        if index == len(self.tiers) - 1:
            return self.prepare(key[0], module)
        if tier.device.type == "cpu" and self.compute.device.type == "cuda":
            module._apply(torch.Tensor.pin_memory)  # page-locked host memory copies to the GPU faster
        return module

    def _load(self, key: Key, keep: set[Key], prefetch: bool) -> tuple[nn.Module | None, int]:
        """Bring an expert into the compute tier through the tiers below it; returns it and the
        bytes reserved for it in the compute tier. A prefetch must find room without evicting
        `keep` and gives up (None) when there is none; a load the forward pass waits for
        evicts whatever it must (all but pinned experts)."""
        reserved = self.expert_bytes
        with self._lock:
            if not self.compute.make_room(reserved, keep) and prefetch:
                return None, 0
            self.compute.used += reserved
            found, source = None, -1
            for i in range(len(self.tiers) - 2, -1, -1):  # the tiers between disk and the compute tier
                found = self.tiers[i].get(key)
                if found is not None:
                    self.tiers[i].stats.hits += 1
                    source = i
                    break
                self.tiers[i].stats.misses += 1
        try:
            module = found if found is not None else self._read(key)
            for i in range(source + 1, len(self.tiers)):
                module = self._into(i, key, module)
                if i < len(self.tiers) - 1:
                    size = module_bytes(module)
                    with self._lock:
                        if self.tiers[i].make_room(size):
                            self.tiers[i].put(key, module, size)
        except BaseException:
            with self._lock:
                self.compute.used -= reserved
            raise
        size = module_bytes(module)
        with self._lock:
            self.compute.put(key, module, size, reserved)
        return module, reserved

    def get(self, layer: int, e: int) -> nn.Module:
        """The expert, ready to compute (blocks until it is loaded). A hit is an expert that is
        in the compute tier when asked for; one still on its way from a prefetch is a miss."""
        key = (layer, e)
        with self._lock:
            module = self.compute.get(key)
            if module is not None:
                self.compute.stats.hits += 1
                self._count_prefetch_use(key)
                return module
            pending = self._pending.get(key)
            if pending is None:  # load it here; a prefetch of the same expert will see it in flight
                mine = self._pending[key] = Future()
        t0 = time.perf_counter()
        try:
            with self._lock:
                self.compute.stats.misses += 1  # not ready when asked for, even if a prefetch is bringing it
            if pending is not None:
                module = pending.result()  # None: the prefetch found no room
                if module is not None:
                    with self._lock:
                        self._count_prefetch_use(key)
                        self.stats.prefetch_late += 1
                else:
                    module, _ = self._load(key, set(), prefetch=False)
            else:
                try:
                    module, _ = self._load(key, set(), prefetch=False)
                finally:
                    with self._lock:
                        del self._pending[key]
                    mine.set_result(module)
        finally:
            self.stats.stall_s += time.perf_counter() - t0
        return module

    def _count_prefetch_use(self, key: Key) -> None:
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats.prefetch_used += 1

    # -- pinning and prefetch

    def pin(self, keys: list[Key], progress: bool = False) -> None:
        """Load these experts now and never evict them."""
        from tqdm import tqdm

        for key in tqdm(keys, desc="pinning experts", unit="expert", disable=not progress or not keys):
            self.get(*key)
            with self._lock:
                self.compute.pinned.add(key)
                self.compute.stats.misses -= 1  # loading ahead is not a miss of the workload

    def set_busy(self, layer: int, experts: set[int]) -> None:
        with self._lock:
            self._busy = {(layer, e) for e in experts}

    def record_choice(self, layer: int, experts: set[int]) -> None:
        """Compare the experts layer's router chose with the guess made for it."""
        guess = self._guess.pop(layer, None)
        if guess is not None:
            self.stats.guessed += len(experts)
            self.stats.guessed_right += len(experts & guess)

    def prefetch(self, layer: int, experts: set[int]) -> None:
        """Start loading these experts of `layer` in the background (those not already here)."""
        self._guess[layer] = experts
        if self._worker is None:
            return
        for e in sorted(experts):
            key = (layer, e)
            with self._lock:
                if key in self.compute.entries or key in self._pending:
                    continue
                future = Future()
                self._pending[key] = future
            self._worker.submit(self._prefetch_one, key, future)

    def _prefetch_one(self, key: Key, future: Future) -> None:
        try:
            with self._lock:
                keep = self._busy | set(self._pending) | self._prefetched
            module, _ = self._load(key, keep, prefetch=True)
            with self._lock:
                if module is None:
                    self.stats.prefetch_skipped += 1
                else:
                    self.stats.prefetch_loads += 1
                    self._prefetched.add(key)
        except BaseException as exc:  # handed to the forward pass, if it waits for this expert
            with self._lock:
                del self._pending[key]
            future.set_exception(exc)
            return
        with self._lock:
            del self._pending[key]
        future.set_result(module)

    def wait(self) -> None:
        """Let loads in flight finish (before measuring memory, or closing); a failed one
        raises where the forward pass asks for its expert, not here."""
        with self._lock:
            pending = list(self._pending.values())
        futures.wait(pending)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None


# --------------------------------------------------------------------------- the transform


class OffloadedExperts(nn.Module):
    """Stands where a layer's experts stood, with the same call: reads the routing on the host
    (the store must know which experts to load), fetches each chosen expert from the store
    and runs it. Holds no weights itself; transforms given to it are applied to each expert
    as it loads."""

    def __init__(self, store: ExpertStore, layer: int, num_experts: int) -> None:
        super().__init__()
        self.store, self.layer, self.num_experts = store, layer, num_experts

    def __len__(self) -> int:
        return self.num_experts

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        return dispatch_sorted(self.expert, self.num_experts, x, expert_indices, expert_weights)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.store.get(self.layer, e).expert(0, x)

    def map_experts(self, fn: Callable[[nn.Module], nn.Module]) -> OffloadedExperts:
        self.store.steps[self.layer].append(lambda experts: experts.map_experts(fn))
        return self

    def for_inference(self, kernels) -> OffloadedExperts:
        self.store.steps[self.layer].append(lambda experts: experts.for_inference(kernels))
        return self

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, offloaded"


class _Prefetcher:
    """Guesses layer L+1's experts from layer L's hidden state: a hook keeps the residual
    entering each layer's ffn_norm, and the routing observer, when layer L is routed, applies
    layer L+1's norm and router to it."""

    def __init__(self, model: nn.Module, store: ExpertStore) -> None:
        self.model, self.store = model, store
        self.hidden: torch.Tensor | None = None
        self.handles = [layer.ffn_norm.register_forward_hook(self._keep_hidden) for layer in model.layers]
        self.observer = observe_routing(model, self._routed)

    def _keep_hidden(self, module, inputs, output) -> None:
        self.hidden = inputs[0]  # the residual stream after this layer's attention

    @torch.no_grad()
    def _routed(self, layer_idx: int, router_logits, expert_weights, expert_indices) -> None:
        chosen = set(expert_indices.reshape(-1).tolist())
        self.store.set_busy(layer_idx, chosen)
        self.store.record_choice(layer_idx, chosen)
        nxt = layer_idx + 1
        if nxt >= len(self.model.layers) or self.hidden is None:
            return
        layer = self.model.layers[nxt]
        h = self.hidden.reshape(-1, self.hidden.shape[-1])  # [N, H]
        router_logits = F.linear(layer.ffn_norm.forward(h), layer.moe.router.weight)  # [N, E]; .forward: no hooks
        guess = torch.topk(router_logits, layer.moe.router.top_k, dim=-1).indices  # [N, K]
        self.store.prefetch(nxt, set(guess.reshape(-1).tolist()))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.observer.remove()


def offload_experts(model: nn.Module, sources: dict[str, torch.Tensor], spec: OffloadSpec) -> ExpertStore:
    """The transform: serve `model`'s experts (left on `meta` by
    loader.build_model with `deferred`, their weights in `sources`) from an ExpertStore with
    spec.max_memory bytes on the model's device (plus a spec.max_cpu_memory RAM tier when that
    device is a GPU). The store starts (measures, pins spec.profile's hottest experts) when
    the loader calls `start_store`, after the transforms that follow this one."""
    return_freed_memory()
    device = model.device
    tiers = []
    if spec.max_cpu_memory > 0:
        if device.type == "cpu":
            raise SmoeError("--max-cpu-memory is a RAM tier under a GPU's expert cache; on the CPU, "
                            "--max-memory is the RAM budget")
        tiers.append(("ram", torch.device("cpu"), spec.max_cpu_memory))
    tiers.append(("ram" if device.type == "cpu" else str(device), device, spec.max_memory))
    by_key: dict[Key, dict[str, torch.Tensor]] = {}
    for name, view in sources.items():
        m = re.fullmatch(r"layers\.(\d+)\.moe\.experts\.(\d+)\.(.+)", name)
        if m is None:
            raise SmoeError(f"not an expert weight: {name}")
        by_key.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = view
    config = model.config
    templates = [layer.moe.experts[0] for layer in model.layers]  # on meta: the structure to fill
    store = ExpertStore(by_key, templates, model.dtype, tiers, policy=spec.policy, prefetch=spec.prefetch,
                        top_k=config.num_experts_per_tok)
    for i, layer in enumerate(model.layers):
        layer.moe.experts = OffloadedExperts(store, i, config.num_local_experts)
    store.hooks = _Prefetcher(model, store)
    model.expert_store = store
    return store


def start_store(model: nn.Module, spec: OffloadSpec, progress: bool = False) -> None:
    """Start the model's expert store, pinning the hottest experts of spec.profile."""
    config = model.config

    def pinned(store: ExpertStore) -> list[Key]:
        keys = pinned_experts(read_profile(spec.profile, config), store.compute.budget, store.expert_bytes,
                              config.num_experts_per_tok)
        if not keys:
            warnings.warn(f"{spec.profile}: the budget ({format_bytes(store.compute.budget)}) leaves no room to "
                          f"pin experts beyond the {config.num_experts_per_tok} a token needs "
                          f"({format_bytes(store.expert_bytes)} each); nothing is pinned", stacklevel=3)
        return keys

    model.expert_store.start(pinned if spec.profile is not None else None, progress=progress)


# --------------------------------------------------------------------------- usage profiles


def expert_usage(model: nn.Module, token_ids: list[int], window: int = 512, progress: bool = False) -> torch.Tensor:
    """How many token slots each expert of each layer gets on a text: counts [L, E],
    running the text through the model in windows of `window` tokens."""
    from tqdm import tqdm

    config = model.config
    counts = torch.zeros(config.num_hidden_layers, config.num_local_experts, dtype=torch.long)

    def count(layer: int, router_logits, expert_weights, expert_indices) -> None:
        counts[layer] += count_experts(expert_indices, config.num_local_experts).cpu()

    with observe_routing(model, count), torch.inference_mode():
        for start in tqdm(range(0, len(token_ids), window), desc="profiling", unit="window", disable=not progress):
            chunk = torch.tensor([token_ids[start: start + window]], device=model.device)
            model(chunk, last_only=True)
    return counts


def write_profile(path: str | Path, counts: torch.Tensor, tokens: int, source: str = "") -> None:
    data = {"format": PROFILE_FORMAT, "version": 1, "source": source, "tokens": tokens,
            "num_hidden_layers": counts.shape[0], "num_local_experts": counts.shape[1],
            "counts": counts.tolist()}
    atomic_write(Path(path), lambda p: p.write_text(json.dumps(data) + "\n"))


def read_profile(path: str | Path, config) -> torch.Tensor:
    """A `smoe profile` file -> counts [L, E], checked against the model's shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SmoeError(f"{path}: no such expert profile; write one with smoe profile") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SmoeError(f"{path}: not an expert profile (not JSON); write one with smoe profile") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise SmoeError(f"{path}: not an expert profile (no \"format\": \"{PROFILE_FORMAT}\"); "
                        "write one with smoe profile")
    L, E = config.num_hidden_layers, config.num_local_experts
    counts = data.get("counts")
    if (not isinstance(counts, list) or len(counts) != L
            or any(not isinstance(row, list) or len(row) != E for row in counts)
            or any(not isinstance(c, int) or c < 0 for row in counts for c in row)):
        raise SmoeError(f"{path}: field 'counts' must be {L} lists of {E} non-negative integers "
                        f"(one per layer and expert of this model); was the profile written for another model?")
    return torch.tensor(counts, dtype=torch.long)


def pinned_experts(counts: torch.Tensor, budget: int, expert_bytes: int, top_k: int,
                   share: float | None = None) -> list[Key]:
    """The most used experts of a profile counts [L, E] to pin within the budget.

    A token needs L · top_k experts, one layer after the other. With room for at least that
    many, pinning takes `share` of the budget (PIN_SHARE, half) but always leaves L · top_k
    slots to an LRU cache: routing has locality (consecutive tokens often share experts),
    which only a cache that follows the text can use. With less room than one token needs,
    an LRU cache evicts every expert just before the next token asks for it again, so all but
    top_k slots (the layer being computed) are pinned. Worked example, the demo model
    (L = 6, top_k = 2, so 12 slots a token): budget 24 -> 12 pinned, 12 LRU; budget 18 -> 6
    pinned; budget 12 -> none (plain LRU); budget 6 -> 4 pinned."""
    L, E = counts.shape
    total_slots = budget // expert_bytes
    working_set = L * top_k
    if total_slots < working_set:
        slots = total_slots - top_k
    else:
        share = PIN_SHARE if share is None else share
        slots = min(int(total_slots * share), total_slots - working_set)
    if slots <= 0:
        return []
    flat = counts.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)[:slots].tolist()
    return [(i // E, i % E) for i in order if flat[i] > 0]
