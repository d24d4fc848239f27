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

The data order is a pure function of (seed, step) (batches.py); with the optimizer and
RNG state in each checkpoint, a resumed run retraces the uninterrupted one.

The package: config.py (TrainConfig), losses.py, batches.py, evaluate.py, and this loop.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from smoe import parallel
from smoe.checkpoint import atomic_write, save_checkpoint
from smoe.config import ModelConfig
from smoe.data import read_examples, split_heldout
from smoe.errors import SmoeError
from smoe.loader import build_model
from smoe.lora import apply_lora, load_adapter_weights, save_adapter
from smoe.model import Transformer
from smoe.nf4 import quantize_model_nf4
from smoe.routing import observe_routing
from smoe.tokenizer import HFTokenizer, chat_training_ids, load_tokenizer
from smoe.train.batches import ExampleStream, TokenStream, domain_streams, tokenize_documents
from smoe.train.config import TrainConfig
from smoe.train.evaluate import evaluate
from smoe.train.losses import load_balancing_loss, router_z_loss


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def train_step_loss(model, x, y, cfg: TrainConfig, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Forward one micro-batch; return the total loss and its parts (floats).
    y: targets [B, T], -100 where nothing is learned; valid: [B, T] real (unpadded) tokens."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast == "bf16" and x.device.type == "cpu")
    router_logits: list[torch.Tensor | None] = [None] * len(model.layers)  # [N, E] per layer, as routed

    def keep(layer: int, logits: torch.Tensor, expert_weights, expert_indices) -> None:
        if router_logits[layer] is None:  # not again when gradient checkpointing recomputes the layer
            router_logits[layer] = logits

    with autocast, observe_routing(model, keep):
        logits = model(x)  # [B, T, V]
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

    final = run / f"ckpt-{step:07d}"
    tmp = run / f".ckpt-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora is not None:

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


def model_to_train(cfg: TrainConfig, vocab_size: int | None, adapter: Path | None = None):
    """The model to train: new (random init), loaded from init_from, or init_from wrapped in
    LoRA adapters (over an NF4 base for QLoRA), with adapter weights from `adapter` when resuming."""

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
        model = build_model(cfg.init_from, dtype=base_dtype)
        model.config.router_jitter_noise = cfg.router_jitter
        for layer in model.layers:
            layer.moe.jitter_noise = cfg.router_jitter
        if cfg.lora is None:
            model.requires_grad_(True)
        else:

            if qlora:

                quantize_model_nf4(model)
                model.float()  # embeddings, norms, routers, lm_head: fp32 master weights
            apply_lora(model, cfg.lora_spec(), seed=cfg.seed, adapter_dtype=torch.float32)
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

    dp = parallel.DataParallel() if parallel.launched() else None  # under torchrun: data parallel
    if dp is not None and cfg.batch_size % dp.world:
        raise SmoeError(f"batch size {cfg.batch_size} does not split over {dp.world} processes; "
                        f"use a multiple of {dp.world}")
    lead = dp is None or dp.rank == 0  # the process that prints and writes
    progress = progress and lead
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
            model = model_to_train(cfg, None, adapter=ckpt)
        else:
            model = model_to_train(replace(cfg, init_from=str(ckpt), model=None), None)
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
        model = model_to_train(cfg, tokenizer.vocab_size)
        optimizer = _optimizer(model, cfg)
    if lead:
        (run / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    model.train()

    if heldout and cfg.init_from and start_step == 0:  # the starting point a fine-tune improves on
        history.append({"step": 0, "eval": evaluate(model, heldout, cfg)})
        if lead:
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
            if dp is not None:  # this rank's rows of the batch
                x, y, valid = dp.rows(x, y, valid)
            loss, parts = train_step_loss(model, x, y, cfg, valid)
            (loss / cfg.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            tokens_window += (x.numel() if valid is None else int(valid.sum())) * (dp.world if dp else 1)
        if dp is not None:  # every rank makes the same update
            dp.average_gradients(trainable)
            sums = dp.average(sums)
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
            if lead:
                bar.write(f"step {done}: held-out perplexity " +
                          ", ".join(f"{d} {p:.2f}" for d, p in history[-1]["eval"].items()))
        if lead and (done % cfg.save_every == 0 or done == last_step):
            _save(run, model, optimizer, done, cfg, history, elapsed_before + time.perf_counter() - t_start)
            plot_history(history, run / "loss.png", title=f"{run.name}: training")
        if done % cfg.log_every == 0:  # evaluation and saving stay out of the next window's tokens/s
            t_window = time.perf_counter()
        bar.update(1)
    bar.close()
    model.eval()
    wall = elapsed_before + time.perf_counter() - t_start
    if last_step == cfg.max_steps and lead:
        if cfg.lora is not None:  # the finished adapter at the top of the run: --adapter RUN_DIR

            save_adapter(model, run, base_model=cfg.init_from)
        (run / "summary.json").write_text(json.dumps({"steps": last_step, "wall_s": round(wall, 1)}) + "\n")
    return {"steps": last_step, "wall_s": wall, "history": history, "model": model}
