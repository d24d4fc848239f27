"""Write a Mixtral checkpoint with random weights (fixed seed), saved by transformers.

    python benchmarks/random_checkpoint.py --preset bench --out benchmarks/out/bench-ckpt

Presets:
  bench  hidden 1024, 16 layers, 16 heads, 4 kv heads, ffn 3584, 8 experts (top-2), vocab 32000 (bf16, ~2.9 GB)
  medium hidden 512, 8 layers, 8 heads, 2 kv heads, ffn 1792, 8 experts (top-2), vocab 32000 (bf16, ~0.43 GB;
         the fine-tuning memory benchmark)
  tiny   hidden 64, 2 layers, 4 heads, 2 kv heads, ffn 128, 8 experts (top-2), vocab 32000 (Mixtral's v1 tokenizer)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

PRESETS = {
    "bench": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=4096),
    "medium": dict(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                   max_position_embeddings=4096),
    "tiny": dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                 max_position_embeddings=2048, sliding_window=1024),
}


def write(out: Path, preset: str, dtype: torch.dtype, seed: int = 0, with_tokenizer: bool = True) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    if (out / "config.json").exists():
        return out
    config = MixtralConfig(**PRESETS[preset], rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(seed)
    model = MixtralForCausalLM._from_config(config, dtype=dtype)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if with_tokenizer:
        try:
            import mistral_common

            shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tmp / "tokenizer.model")
        except ImportError:
            pass
    tmp.rename(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(write(args.out, args.preset, dtype, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
