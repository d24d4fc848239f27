"""Training: from scratch, from a checkpoint, or fine-tuning with LoRA / QLoRA adapters.

    smoe train --config configs/demo.json            # writes runs/demo/
    smoe train --config configs/demo.json --resume   # continues from the last checkpoint
    smoe finetune --model DIR --data FILE --out ADAPTER_DIR [--qlora] [--chat]   # builds a TrainConfig

Fine-tuning is the same loop over a different model and data: `lora` (a sub-config)
wraps the base in LoRA adapters (smoe/lora.py) — over an NF4 base for QLoRA
(smoe/quantize.py) — and only the adapters train; checkpoints then hold the adapter and
the optimizer state, not the base. Chat data trains only on assistant tokens (targets
of other tokens are -100, which cross-entropy ignores).

Loss = next-token cross-entropy
     + aux_loss_coef * load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4;
       the formulation transformers implements as `load_balancing_loss_func`)
     + z_loss_coef * router z-loss (ST-MoE, Zoph et al. 2022, eq. 5).

The data order is a pure function of (seed, step): batch m is drawn from the m-th slots
of a chain of seeded permutations of the training chunks. Together with the optimizer and
RNG state in each checkpoint, this makes a resumed run retrace the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from smoe.config import ModelConfig
from smoe.errors import SmoeError


@dataclass
class TrainConfig:
    out: str
    model: dict | None = None  # HF config.json fields of a new model ...
    init_from: str | None = None  # ... or a checkpoint directory to continue from
    train_data: str = "data/corpus/train.jsonl"
    heldout_data: str | None = "data/corpus/heldout.jsonl"
    tokenizer: str | None = "data/corpus/tokenizer.json"  # None: the init_from model's own
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.02
    aux_loss_per_layer: bool = True  # False = transformers' pooled formulation (see load_balancing_loss)
    z_loss_coef: float = 0.0
    router_jitter: float = 0.0
    autocast: str = "bf16"  # "bf16" (CPU autocast) or "none" (fp32)
    init_std: float = 0.02
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250  # 0: five evaluations over the run
    eval_tokens: int = 8192  # held-out tokens per domain
    save_every: int = 250  # 0: five checkpoints over the run
    keep_checkpoints: int = 2
    threads: int | None = None
    epochs: float | None = None  # when set, max_steps = epochs over the training data
    chat: bool = False  # train_data holds {"messages": [...]} conversations: learn assistant tokens only
    gradient_checkpointing: bool = False
    # LoRA fine-tuning: {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", ...], "quantize": "nf4" | None}
    lora: dict | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SmoeError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise SmoeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SmoeError(f"{path}: unknown field '{unknown[0]}'; known fields: {', '.join(sorted(known))}")
        if "out" not in data:
            raise SmoeError(f"{path}: missing field 'out' (the run directory)")
        cfg = cls(**data)
        if (cfg.model is None) == (cfg.init_from is None):
            raise SmoeError(f"{path}: give exactly one of 'model' (a new model's config) or 'init_from'")
        try:
            cfg.validate()
        except SmoeError as e:
            raise SmoeError(f"{path}: {e}") from None
        return cfg

    def validate(self) -> None:
        if self.autocast not in ("bf16", "none"):
            raise SmoeError("autocast must be 'bf16' or 'none'")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise SmoeError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise SmoeError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs <= 0:
            raise SmoeError(f"epochs must be positive, got {self.epochs}")
        if self.lora is not None:
            if self.init_from is None:
                raise SmoeError("LoRA fine-tuning needs a base model: set 'init_from'")
            known = {"rank", "alpha", "dropout", "targets", "quantize"}
            unknown = sorted(set(self.lora) - known)
            if unknown:
                raise SmoeError(f"lora: unknown field '{unknown[0]}'; known fields: {', '.join(sorted(known))}")
            if self.lora.get("quantize") not in (None, "nf4"):
                raise SmoeError(f"lora.quantize must be 'nf4' or null, got {self.lora['quantize']!r}")
            if not 0 <= self.lora.get("dropout", 0.0) < 1:
                raise SmoeError("lora.dropout must be in [0, 1)")


# ------------------------------------------------------------------------ losses


def load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None, per_layer: bool = False
) -> torch.Tensor:
    """Switch Transformer auxiliary loss, summed over layers' tokens:

        E * Σ_e f_e · P_e,   f_e = share of top-k slots routed to e,  P_e = mean router probability of e

    router_logits: one [N, E] tensor per layer; mask [N] (1 = real token, 0 = padding).

    per_layer=False pools the statistics of all layers before multiplying, exactly as
    transformers' `load_balancing_loss_func` does. That pooled loss is blind to layers that
    each collapse onto different experts (their pooled load looks even), so training uses
    per_layer=True: the mean over layers of the same loss computed for each layer alone,
    as the Switch Transformer adds one auxiliary loss per MoE layer.
    With Σ_e f_e = K, it equals K when routing is perfectly uniform and grows to E·K/... as
    routing collapses onto few experts (K·E when every token picks the same K, with certainty).
    """
    if per_layer:
        return torch.stack([load_balancing_loss([r], top_k, mask) for r in router_logits]).mean()
    E = router_logits[0].shape[-1]
    weights = torch.ones(router_logits[0].shape[0], device=router_logits[0].device) if mask is None else mask.float()
    slots = torch.zeros(E, device=weights.device)
    probs = torch.zeros(E, device=weights.device)
    rows = 0.0
    for logits in router_logits:
        p = torch.softmax(logits.float(), dim=-1)  # [N, E]
        chosen = torch.topk(p, top_k, dim=-1).indices  # [N, K]
        slots = slots + torch.zeros(E, device=p.device).scatter_add_(
            0, chosen.reshape(-1), weights.repeat_interleave(top_k)
        )
        probs = probs + (p * weights[:, None]).sum(0)
        rows = rows + weights.sum()
    return E * torch.sum((slots / rows) * (probs / rows))


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared log-partition of the router logits: keeps them small and the softmax stable."""
    return torch.stack([torch.logsumexp(r.float(), dim=-1).pow(2).mean() for r in router_logits]).mean()


def expert_load(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """[L, E] share of top-k slots each expert receives, per layer."""
    E = router_logits[0].shape[-1]
    loads = []
    for logits in router_logits:
        chosen = torch.topk(logits.float(), top_k, dim=-1).indices
        loads.append(torch.bincount(chosen.reshape(-1), minlength=E).float() / chosen.numel())
    return torch.stack(loads)


# -------------------------------------------------------------------------- data


def tokenize_documents(docs: list[dict], tokenizer) -> list[list[int]]:
    texts = [d["text"] for d in docs]
    if hasattr(tokenizer, "tok"):  # tokenizers' batch encoder: much faster on many documents
        encoded = [e.ids for e in tokenizer.tok.encode_batch(texts, add_special_tokens=False)]
    else:
        encoded = [tokenizer.encode(t, bos=False) for t in texts]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return [bos + e + eos for e in encoded]


class SeededOrder:
    """An infinite order over num_chunks items: a chain of seeded permutations, one per
    epoch, so the item at any slot is a pure function of (seed, slot)."""

    def __init__(self, num_chunks: int, seed: int) -> None:
        self.num_chunks, self.seed = num_chunks, seed
        self._perm_epoch: int | None = None  # the epoch whose permutation is held
        self._perm_cached = torch.empty(0, dtype=torch.long)

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_epoch, self._perm_cached = epoch, torch.randperm(self.num_chunks, generator=g)
        return self._perm_cached

    def item_at(self, slot: int) -> int:
        epoch, pos = divmod(slot, self.num_chunks)
        return int(self._perm(epoch)[pos])


class TokenStream(SeededOrder):
    """Documents shuffled once (seeded) and concatenated; served as seq_len+1 windows."""

    def __init__(self, token_docs: list[list[int]], seq_len: int, seed: int) -> None:
        order = torch.randperm(len(token_docs), generator=torch.Generator().manual_seed(seed)).tolist()
        self.tokens = torch.tensor([t for i in order for t in token_docs[i]], dtype=torch.long)
        self.seq_len = seq_len
        num_chunks = (len(self.tokens) - 1) // seq_len
        if num_chunks < 1:
            raise SmoeError(f"not enough training tokens ({len(self.tokens)}) for one sequence of {seq_len}; "
                            "add data or lower the sequence length")
        super().__init__(num_chunks, seed)

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The index-th batch of the infinite seeded order: inputs and targets [B, T]
        (every position is a real token: no padding mask)."""
        rows = []
        for slot in range(index * batch_size, (index + 1) * batch_size):
            start = self.item_at(slot) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        chunk = torch.stack(rows)  # [B, T+1]
        return chunk[:, :-1], chunk[:, 1:], None


class ExampleStream(SeededOrder):
    """Chat examples, one per row, right-padded to the longest row of the batch.

    Targets are -100 (ignored by cross-entropy) except where the next token is trained
    (an assistant token); `valid` [B, T] marks real tokens, so padding stays out of the
    load-balancing loss. Examples longer than seq_len+1 tokens are truncated.
    """

    def __init__(self, examples: list[tuple[list[int], list[bool]]], seq_len: int, seed: int, pad_id: int) -> None:
        kept = [(ids[: seq_len + 1], trained[: seq_len + 1]) for ids, trained in examples]
        self.truncated = sum(len(ids) > seq_len + 1 for ids, _ in examples)
        self.examples = [(ids, trained) for ids, trained in kept if any(trained[1:])]
        if not self.examples:
            raise SmoeError("no example has an assistant token within the sequence length; "
                            "raise --seq-len or shorten the prompts")
        super().__init__(len(self.examples), seed)
        self.pad_id = pad_id

    def rows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = max(len(self.examples[i][0]) for i in indices) - 1
        x = torch.full((len(indices), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(indices), T), -100, dtype=torch.long)
        valid = torch.zeros((len(indices), T), dtype=torch.bool)
        for row, i in enumerate(indices):
            ids, trained = self.examples[i]
            n = len(ids) - 1
            x[row, :n] = torch.tensor(ids[:-1])
            y[row, :n] = torch.where(torch.tensor(trained[1:]), torch.tensor(ids[1:]), -100)
            valid[row, :n] = True
        return x, y, valid

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rows([self.item_at(slot) for slot in range(index * batch_size, (index + 1) * batch_size)])


def domain_streams(token_docs: list[list[int]], docs: list[dict]) -> dict[str, torch.Tensor]:
    by_domain: dict[str, list[int]] = {}
    for doc, tokens in zip(docs, token_docs, strict=True):
        by_domain.setdefault(doc.get("domain", "all"), []).extend(tokens)
    return {d: torch.tensor(t, dtype=torch.long) for d, t in sorted(by_domain.items())}


@torch.no_grad()
def stream_perplexity(model, tokens: torch.Tensor, seq_len: int, max_tokens: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over the first max_tokens predictions of a token stream,
    in non-overlapping windows of seq_len (each window starts without context)."""
    tokens = tokens[: max_tokens + 1]
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_len):
        window = tokens[start : start + seq_len + 1]
        if len(window) < 2:
            break
        logits = model(window[None, :-1]).float()  # [1, T, V]
        nll += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count), count


def heldout_perplexity(model, tokenizer, docs: list[dict], seq_len: int, max_tokens: int) -> dict[str, float]:
    streams = domain_streams(tokenize_documents(docs, tokenizer), docs)
    return {d: round(stream_perplexity(model, s, seq_len, max_tokens)[0], 4) for d, s in streams.items()}


@torch.no_grad()
def example_perplexity(model, examples: ExampleStream, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean NLL) over the trained (assistant) tokens of every example, in order."""
    nll, count = 0.0, 0
    for start in range(0, examples.num_chunks, batch_size):
        x, y, _ = examples.rows(list(range(start, min(start + batch_size, examples.num_chunks))))
        logits = model(x).float()  # [B, T, V]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += int((y != -100).sum())
    return math.exp(nll / count), count


# ----------------------------------------------------------------------- training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _record_router_logits(model, on: bool) -> None:
    for layer in model.layers:
        layer.moe.record_router_logits = on
        layer.moe.last_router_logits = None


def train_step_loss(model, x, y, cfg: TrainConfig, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Forward one micro-batch; return the total loss and its parts (floats).
    y: targets [B, T], -100 where nothing is learned; valid: [B, T] real (unpadded) tokens."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast == "bf16" and x.device.type == "cpu")
    with autocast:
        logits = model(x)  # [B, T, V]
    router_logits = [layer.moe.last_router_logits for layer in model.layers]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    mask = None if valid is None else valid.reshape(-1)
    aux = load_balancing_loss(router_logits, model.config.num_experts_per_tok, mask, per_layer=cfg.aux_loss_per_layer)
    loss = ce + cfg.aux_loss_coef * aux
    parts = {"ce": ce.item(), "aux": aux.item()}
    if cfg.z_loss_coef:
        z = router_z_loss(router_logits)
        loss = loss + cfg.z_loss_coef * z
        parts["z"] = z.item()
    return loss, parts


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (all of them, or only LoRA adapters)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # norms
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.betas), fused=False,
    )


def _save(run: Path, model, optimizer, step: int, cfg: TrainConfig, history: list[dict], elapsed: float) -> Path:
    """Write ckpt-STEP/ through a temporary directory, then point `latest` at it."""
    from smoe.checkpoint import atomic_write, save_checkpoint

    final = run / f"ckpt-{step:07d}"
    tmp = run / f".ckpt-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora is not None:
        from smoe.lora import save_adapter

        save_adapter(model, tmp, base_model=cfg.init_from)
    else:
        save_checkpoint(model, tmp, dtype="fp32")
    torch.save(
        {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": step, "elapsed_s": elapsed},
        tmp / "trainer_state.pt",
    )
    (tmp / "history.json").write_text(json.dumps(history))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(run / "latest", lambda p: p.write_text(final.name + "\n"))
    kept = sorted(run.glob("ckpt-*"))
    for old in kept[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def plot_history(history: list[dict], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "ce" in h]
    evals = [h for h in history if "eval" in h]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([h["step"] for h in train], [h["ce"] for h in train], lw=1, label="train cross-entropy")
    for domain in sorted(evals[0]["eval"]) if evals else []:
        ax.plot([h["step"] for h in evals], [math.log(h["eval"][domain]) for h in evals], marker="o", ms=3,
                lw=1, label=f"held-out {domain}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def build_model(cfg: TrainConfig, vocab_size: int | None, adapter: Path | None = None):
    """The model to train: new (random init), loaded from init_from, or init_from wrapped in
    LoRA adapters (over an NF4 base for QLoRA), with adapter weights from `adapter` when resuming."""
    from smoe.checkpoint import load_model
    from smoe.model import Transformer

    if cfg.init_from:
        qlora = cfg.lora is not None and cfg.lora.get("quantize") == "nf4"
        # QLoRA quantizes straight from the memory-mapped checkpoint, so the full-precision
        # weights of the quantized linears are never all in memory at once; a LoRA base that
        # only ever computes in bf16 (autocast) is kept in bf16: half the memory, no casts
        if qlora:
            base_dtype = None
        elif cfg.lora is not None and cfg.autocast == "bf16":
            base_dtype = torch.bfloat16
        else:
            base_dtype = torch.float32
        model = load_model(cfg.init_from, dtype=base_dtype)
        model.config.router_jitter_noise = cfg.router_jitter
        for layer in model.layers:
            layer.moe.jitter_noise = cfg.router_jitter
        if cfg.lora is None:
            model.requires_grad_(True)
        else:
            from smoe.lora import apply_lora, load_adapter_weights

            if qlora:
                from smoe.quantize import quantize_model_nf4

                quantize_model_nf4(model)
                model.float()  # embeddings, norms, routers, lm_head: fp32 master weights
            apply_lora(model, cfg.lora.get("targets", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                       rank=int(cfg.lora.get("rank", 8)), alpha=float(cfg.lora.get("alpha", 16)),
                       dropout=float(cfg.lora.get("dropout", 0.0)), seed=cfg.seed, adapter_dtype=torch.float32)
            if adapter is not None:
                load_adapter_weights(model, adapter)
    else:
        config = ModelConfig.from_hf_dict({"model_type": "mixtral", "vocab_size": vocab_size, **cfg.model},
                                          source="train config 'model'")
        if config.vocab_size < vocab_size:
            raise SmoeError(f"model vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}")
        config.router_jitter_noise = cfg.router_jitter
        model = Transformer(config)
        model.rope.reset_parameters()
        model.init_weights(std=cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def _tokenizer(cfg: TrainConfig):
    from smoe.tokenizer import HFTokenizer, load_tokenizer

    if cfg.tokenizer:
        return HFTokenizer(cfg.tokenizer) if Path(cfg.tokenizer).suffix == ".json" else load_tokenizer(cfg.tokenizer)
    tokenizer = load_tokenizer(cfg.init_from) if cfg.init_from else None
    if tokenizer is None:
        raise SmoeError(f"{cfg.init_from}: the model has no tokenizer files (tokenizer.json or tokenizer.model); "
                        "add them or name a tokenizer")
    return tokenizer


def load_data(cfg: TrainConfig, tokenizer) -> tuple[TokenStream | ExampleStream, dict]:
    """The training stream and the held-out sets ({name: token tensor or ExampleStream}).
    Without a held-out file, a fine-tune holds out part of its data (data.split_heldout)."""
    from smoe.data import read_examples, split_heldout
    from smoe.tokenizer import chat_training_ids

    train_examples = read_examples(Path(cfg.train_data), chat=cfg.chat)
    if cfg.heldout_data:
        heldout_examples = read_examples(Path(cfg.heldout_data), chat=cfg.chat)
    elif cfg.init_from:
        train_examples, heldout_examples = split_heldout(train_examples)
    else:
        heldout_examples = []
    if not cfg.chat:
        stream = TokenStream(tokenize_documents(train_examples, tokenizer), cfg.seq_len, cfg.seed)
        heldout = domain_streams(tokenize_documents(heldout_examples, tokenizer), heldout_examples)
        return stream, heldout
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0

    def examples(items: list[dict], file: str) -> ExampleStream:
        rendered = []
        for n, item in enumerate(items):
            try:
                rendered.append(chat_training_ids(tokenizer, item["messages"]))
            except SmoeError as e:
                raise SmoeError(f"{file}: example {n + 1}: {e}") from None
        return ExampleStream(rendered, cfg.seq_len, cfg.seed, pad_id)

    stream = examples(train_examples, cfg.train_data)
    if stream.truncated:
        print(f"note: {stream.truncated} conversation(s) longer than {cfg.seq_len + 1} tokens were truncated")
    heldout = {"assistant": examples(heldout_examples, cfg.heldout_data or cfg.train_data)} if heldout_examples else {}
    return stream, heldout


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) training; returns a summary. stop_after: stop early after that many
    steps of this call (used to test that resuming retraces an uninterrupted run)."""
    from tqdm import tqdm

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(cfg)
    stream, heldout = load_data(cfg, tokenizer)
    if cfg.epochs is not None:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * stream.num_chunks / (cfg.batch_size * cfg.grad_accum)))
    cfg.eval_every = cfg.eval_every or math.ceil(cfg.max_steps / 5)
    cfg.save_every = cfg.save_every or math.ceil(cfg.max_steps / 5)

    torch.manual_seed(cfg.seed)
    start_step, history, elapsed_before = 0, [], 0.0
    if resume and (run / "latest").exists():
        ckpt = run / (run / "latest").read_text().strip()
        if cfg.lora is not None:
            model = build_model(cfg, None, adapter=ckpt)
        else:
            model = build_model(replace(cfg, init_from=str(ckpt), model=None), None)
        optimizer = _optimizer(model, cfg)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_step = state["step"]
        elapsed_before = float(state.get("elapsed_s", 0.0))
        history = json.loads((ckpt / "history.json").read_text())
    else:
        if resume:
            print(f"no checkpoint in {run} to resume from; starting from step 0")
        model = build_model(cfg, tokenizer.vocab_size)
        optimizer = _optimizer(model, cfg)
    (run / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    model.train()
    _record_router_logits(model, True)

    if heldout and cfg.init_from and start_step == 0:  # the starting point a fine-tune improves on
        history.append({"step": 0, "eval": evaluate(model, heldout, cfg)})
        print("step 0: held-out perplexity " + ", ".join(f"{d} {p:.2f}" for d, p in history[-1]["eval"].items()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    last_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, start_step + stop_after)
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)
    t_start, t_window, tokens_window = time.perf_counter(), time.perf_counter(), 0
    for step in range(start_step, last_step):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            x, y, valid = stream.batch(step * cfg.grad_accum + micro, cfg.batch_size)
            loss, parts = train_step_loss(model, x, y, cfg, valid)
            (loss / cfg.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            tokens_window += x.numel() if valid is None else int(valid.sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.log_every == 0 or done == last_step:
            now = time.perf_counter()
            tok_s = tokens_window / (now - t_window)
            t_window, tokens_window = now, 0
            history.append({"step": done, **{k: round(v, 5) for k, v in sums.items()}, "lr": lr,
                            "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tok_s, 1)})
            bar.set_postfix(loss=f"{sums['ce']:.3f}", aux=f"{sums['aux']:.3f}", tok_s=f"{tok_s:.0f}")
        if heldout and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            history.append({"step": done, "eval": evaluate(model, heldout, cfg)})
            bar.write(f"step {done}: held-out perplexity " +
                      ", ".join(f"{d} {p:.2f}" for d, p in history[-1]["eval"].items()))
        if done % cfg.save_every == 0 or done == last_step:
            _save(run, model, optimizer, done, cfg, history, elapsed_before + time.perf_counter() - t_start)
            plot_history(history, run / "loss.png", title=f"{run.name}: training")
        if done % cfg.log_every == 0:  # evaluation and saving stay out of the next window's tokens/s
            t_window = time.perf_counter()
        bar.update(1)
    bar.close()
    _record_router_logits(model, False)
    model.eval()
    wall = elapsed_before + time.perf_counter() - t_start
    if last_step == cfg.max_steps:
        if cfg.lora is not None:  # the finished adapter at the top of the run: --adapter RUN_DIR
            from smoe.lora import save_adapter

            save_adapter(model, run, base_model=cfg.init_from)
        (run / "summary.json").write_text(json.dumps({"steps": last_step, "wall_s": round(wall, 1)}) + "\n")
    return {"steps": last_step, "wall_s": wall, "history": history, "model": model}


def evaluate(model, heldout: dict, cfg: TrainConfig) -> dict[str, float]:
    """Held-out perplexity per set: token streams (per domain) or chat examples (assistant tokens)."""
    was_training = model.training
    model.eval()
    result = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
        for name, data in heldout.items():
            if isinstance(data, ExampleStream):
                result[name] = round(example_perplexity(model, data, cfg.batch_size)[0], 3)
            else:
                result[name] = round(stream_perplexity(model, data, cfg.seq_len, cfg.eval_tokens)[0], 3)
    model.train(was_training)
    return result
