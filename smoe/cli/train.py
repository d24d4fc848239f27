"""smoe train, smoe finetune: train a model, or LoRA / QLoRA adapters over one."""

from __future__ import annotations

from pathlib import Path

from smoe.config import ModelConfig
from smoe.errors import SmoeError
from smoe.loader import model_path
from smoe.options import DEFAULT_LORA_RANK, parse_targets
from smoe.train import TrainConfig, train


def register(sub) -> None:
    t = sub.add_parser("train", help="train a model (from scratch or a checkpoint)",
                       description="Train with next-token cross-entropy plus Mixtral's load-balancing loss.")
    t.add_argument("--config", required=True, metavar="FILE", help="training config (JSON), e.g. configs/demo.json")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    t.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    t.set_defaults(run=cmd_train)

    f = sub.add_parser("finetune", help="fine-tune a model with LoRA or QLoRA adapters",
                       description="Fine-tune with LoRA (or QLoRA: LoRA over a frozen 4-bit NF4 base) on plain text "
                                   "or chat data; writes a PEFT-format adapter to --out.")
    f.add_argument("--model", metavar="DIR", default=None, help="base checkpoint directory (default: the demo model)")
    f.add_argument("--data", required=True, metavar="FILE",
                   help="training data: JSONL with 'text' per line, a plain text file, or (with --chat) "
                        "JSONL with 'messages'")
    f.add_argument("--chat", action="store_true",
                   help="the data are conversations; learn only the assistant's tokens")
    f.add_argument("--heldout", metavar="FILE", default=None,
                   help="held-out data in the same format (default: every 20th example of --data)")
    f.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory; the adapter is saved here")
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    lg = f.add_argument_group("adapters")
    lg.add_argument("--lora-rank", type=int, default=None, help=f"adapter rank r (default {DEFAULT_LORA_RANK})")
    lg.add_argument("--lora-alpha", type=float, default=None, help="scale alpha; updates are scaled by alpha/r "
                    "(default 2r)")
    lg.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapter input (default 0)")
    lg.add_argument("--targets", default=None,
                    help="comma-separated modules: q_proj, k_proj, v_proj, o_proj, w1, w2, w3 (every expert), "
                         "router; or the groups attention, experts, all (default attention)")
    lg.add_argument("--qlora", action="store_true", help="quantize the frozen base to NF4 (QLoRA)")
    lg.add_argument("--full", action="store_true", help="train every weight instead of adapters (saves checkpoints)")
    og = f.add_argument_group("optimisation")
    og.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    og.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    og.add_argument("--lr", type=float, default=2e-4, help="peak learning rate, cosine-decayed to a tenth "
                    "(default 2e-4)")
    og.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    og.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
    og.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    og.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    og.add_argument("--aux-loss-coef", type=float, default=0.02,
                    help="weight of the load-balancing loss (default 0.02; 0 = off)")
    og.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in backward: less memory, ~30%% more time")
    og.add_argument("--eval-every", type=int, default=None,
                    help="steps between held-out evaluations (default: 5 over the run)")
    og.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: 5 over the run)")
    og.add_argument("--seed", type=int, default=0, help="random seed (data order, adapter init)")
    f.set_defaults(run=cmd_finetune)


def cmd_train(args) -> int:

    cfg = TrainConfig.from_file(args.config)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise SmoeError("--max-steps must be at least 1")
        cfg.max_steps = args.max_steps
    for name in ("train_data", "tokenizer") + (("heldout_data",) if cfg.heldout_data else ()):
        if not Path(getattr(cfg, name)).exists():
            raise SmoeError(f"{args.config}: {name} '{getattr(cfg, name)}' does not exist; "
                            "build the corpus first: python scripts/build_corpus.py --out data/corpus")
    summary = train(cfg, resume=args.resume)
    print(f"trained {summary['steps']} steps in {summary['wall_s'] / 60:.1f} min; checkpoints in {cfg.out}")
    return 0


def finetune_config(args):
    """The TrainConfig that `smoe finetune` flags describe."""

    model = str(model_path(args.model))  # a directory, a hub id or a .gguf file
    config = ModelConfig.from_dir(model)  # fails early, naming the directory, if it is not a checkpoint
    for flag in ("lora_rank", "batch_size", "grad_accum", "seq_len", "max_steps", "eval_every", "save_every",
                 "warmup_steps"):
        value, floor = getattr(args, flag), 0 if flag == "warmup_steps" else 1
        if value is not None and value < floor:
            raise SmoeError(f"--{flag.replace('_', '-')} must be at least {floor}, got {value}")
    if args.qlora and args.full:
        raise SmoeError("--qlora and --full exclude each other: QLoRA trains adapters over a frozen 4-bit base")
    if args.lora_dropout is not None and not 0 <= args.lora_dropout < 1:
        raise SmoeError("--lora-dropout must be in [0, 1)")
    if args.lr <= 0:
        raise SmoeError("--lr must be positive")
    seq_len = min(args.seq_len, config.max_position_embeddings)
    # flags not given take LoraSpec's defaults (smoe/options.py)
    given = {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
             "targets": None if args.targets is None else parse_targets(args.targets)}
    lora = None if args.full else {
        **{k: v for k, v in given.items() if v is not None}, "quantize": "nf4" if args.qlora else None,
    }
    cfg = TrainConfig(
        out=str(args.out), init_from=model, train_data=args.data, heldout_data=args.heldout, tokenizer=None,
        seq_len=seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_steps=args.max_steps or 1, epochs=None if args.max_steps else (args.epochs or 1.0),
        lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup_steps, weight_decay=0.0,
        aux_loss_coef=args.aux_loss_coef, seed=args.seed, log_every=1,
        eval_every=args.eval_every or 0, save_every=args.save_every or 0,
        chat=args.chat, gradient_checkpointing=args.gradient_checkpointing, lora=lora,
    )
    return cfg


def cmd_finetune(args) -> int:

    cfg = finetune_config(args)
    if not args.resume and (args.out / "latest").exists():
        raise SmoeError(f"{args.out}: holds an earlier run; add --resume to continue it, or choose a new --out")
    summary = train(cfg, resume=args.resume)
    history = summary["history"]
    evals = [h["eval"] for h in history if "eval" in h]
    if len(evals) >= 2:
        print("held-out perplexity: " + ", ".join(f"{d} {evals[0][d]:.2f} -> {p:.2f}" for d, p in evals[-1].items()))
    kind = "model checkpoints" if cfg.lora is None else "adapter"
    print(f"fine-tuned {summary['steps']} steps in {summary['wall_s'] / 60:.1f} min; {kind} in {args.out}")
    if cfg.lora is not None:
        print(f"use it: smoe generate --model {cfg.init_from} --adapter {args.out} --prompt ...")
    return 0
