"""Mixtral-8x7B at full size on a 24 GiB machine: an int4 checkpoint larger than the memory
budget, generated from with the experts offloaded.

    python benchmarks/bench_offload_scale.py                       # write (once) and run, 12 GiB of experts
    python benchmarks/bench_offload_scale.py --max-memory 8GiB --tokens 16

1. Writes a random-weight checkpoint of the real Mixtral-8x7B shape (Jiang et al. 2024, table 1:
   dim 4096, 32 layers, 32 heads, 8 kv heads, hidden 14336, 8 experts, top-2, vocab 32000) in
   smoe's int4 layout (group 128), streamed tensor by tensor so it is never all in memory
   (~25 GB on disk; --out, default benchmarks/out/mixtral-8x7b-int4). Codes are uniform random,
   scales set so weights have a standard deviation of ~0.02.
2. Drops the file from the page cache (posix_fadvise), measures the disk's sequential read and
   the memory's streaming read, then generates in a child process with `smoe.load(...,
   max_memory=...)` and reports prefill and decode tokens/s, the child's peak RSS, the expert
   cache statistics and the bound: bytes missed per token / disk bandwidth + bytes hit / RAM
   bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MIXTRAL_8X7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
    rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
)
SMALL = {**MIXTRAL_8X7B, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2}  # --preset small: a quick check of the script
GROUP = 128
WEIGHT_STD = 0.02


def tensor_specs(c: dict) -> list[tuple[str, str, list[int]]]:
    """(name, safetensors dtype, shape) of every tensor, in file order."""
    H, F, E = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
    q_out, kv_out = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]

    def int4(prefix: str, n_in: int, n_out: int) -> list:
        return [(f"{prefix}.qweight", "U8", [n_out, n_in // 2]),  # smoe-int4 format 1 (smoe/quantize.py)
                (f"{prefix}.scales", "BF16", [n_out, n_in // GROUP]),
                (f"{prefix}.mins", "BF16", [n_out, n_in // GROUP])]

    specs = [("model.embed_tokens.weight", "BF16", [c["vocab_size"], H])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [(f"{p}.input_layernorm.weight", "BF16", [H]), (f"{p}.post_attention_layernorm.weight", "BF16", [H])]
        for name, n_out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            specs += int4(f"{p}.self_attn.{name}", H, n_out)
        specs += int4(f"{p}.self_attn.o_proj", q_out, H)
        specs += [(f"{p}.block_sparse_moe.gate.weight", "BF16", [E, H])]
        for e in range(E):
            x = f"{p}.block_sparse_moe.experts.{e}"
            specs += int4(f"{x}.w1", H, F) + int4(f"{x}.w2", F, H) + int4(f"{x}.w3", H, F)
    specs += [("model.norm.weight", "BF16", [H]), ("lm_head.weight", "BF16", [c["vocab_size"], H])]
    return specs


def make_tensor(name: str, dtype: str, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    if name.endswith(".qweight"):  # uniform codes 0..15 in both nibbles
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if name.endswith(".scales") or name.endswith(".mins"):  # uniform codes: std 4.6 steps, mean 7.5 steps
        scale = WEIGHT_STD / 4.6
        return torch.full(shape, scale if name.endswith(".scales") else -7.5 * scale, dtype=torch.bfloat16)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * WEIGHT_STD).to(torch.bfloat16)


def write_checkpoint(out: Path, shape: dict) -> None:
    """config.json + one model.safetensors written tensor by tensor (then renamed into place)."""
    from tqdm import tqdm

    from smoe.config import ModelConfig
    from smoe.quantize import STORED_FORMATS

    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(**shape, quantization={"method": "smoe", "bits": 4, "group_size": GROUP,
                                                   "format": STORED_FORMATS[4]},
                         torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    specs = tensor_specs(shape)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in specs:
        size = (1 if dtype == "U8" else 2) * int(torch.tensor(shape).prod())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(0)
    tmp = out / "model.safetensors.tmp"
    with open(tmp, "wb") as f, tqdm(total=offset, unit="B", unit_scale=True, desc="writing") as bar:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, dtype, shape in specs:
            t = make_tensor(name, dtype, shape, gen)
            data = t.view(torch.uint8).numpy().tobytes() if dtype != "U8" else t.numpy().tobytes()
            f.write(data)
            bar.update(len(data))
    os.replace(tmp, out / "model.safetensors")


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read_gbs(path: Path, nbytes: int = 2 << 30) -> float:
    """Sequential read of an uncached stretch of the file (dropped from the page cache again after)."""
    drop_page_cache(path)
    buf = bytearray(16 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        start, done = os.path.getsize(path) // 2, 0
        nbytes = min(nbytes, os.path.getsize(path) - start)
        t0 = time.perf_counter()
        while done < nbytes:
            n = os.preadv(fd, [buf], start + done)
            if n == 0:
                break
            done += n
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    drop_page_cache(path)
    return done / seconds / 1e9


CHILD = r"""
import json, re, sys, time, torch, smoe
torch.set_num_threads(int(sys.argv[4]))
t0 = time.perf_counter()
model, _ = smoe.load(sys.argv[1], max_memory=sys.argv[2], prefetch=sys.argv[5] == "1")
load_s = time.perf_counter() - t0
store = model.expert_store
prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(1)).tolist()
tokens = int(sys.argv[3])
engine = smoe.Engine(model, None, max_seq_len=len(prompt) + tokens + 1)
params = smoe.SamplingParams(max_tokens=tokens, ignore_eos=True)
seq = engine.add(prompt, params)  # prefill and the first token
after_prefill = store.stats.to_dict() | {"disk_bytes": store.stats.disk_bytes}
while engine.active:
    engine.step()
store.wait()
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
decoded = len(seq.token_ids) - 1
print(json.dumps({"load_s": load_s, "prefill_s": seq.prefill_s, "decode_s": seq.decode_s, "decoded": decoded,
                  "token_ids": seq.token_ids, "after_prefill": after_prefill, "stats": store.stats.to_dict(),
                  "expert_bytes": store.expert_bytes, "peak_rss": hwm, "budget": store.compute.budget}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["mixtral", "small"], default="mixtral")
    p.add_argument("--out", type=Path, default=None, help="checkpoint directory (default benchmarks/out/PRESET-int4)")
    p.add_argument("--max-memory", default="12GiB", help="expert budget (default 12GiB)")
    p.add_argument("--tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    from bench_kernels import bandwidth_gbs

    shape = MIXTRAL_8X7B if args.preset == "mixtral" else SMALL
    args.out = args.out or ROOT / "benchmarks" / "out" / f"{args.preset}-int4"
    if not (args.out / "model.safetensors").exists():
        write_checkpoint(args.out, shape)
    file = args.out / "model.safetensors"
    print(f"checkpoint: {args.out} ({file.stat().st_size / 1e9:.1f} GB)")
    disk = disk_read_gbs(file)
    ram = bandwidth_gbs(1024)
    print(f"disk sequential read {disk:.2f} GB/s, memory streaming read {ram:.1f} GB/s")
    drop_page_cache(file)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(args.out), args.max_memory, str(args.tokens),
                           str(args.threads), "0" if args.no_prefetch else "1"],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    s, first = out["stats"], out["after_prefill"]
    L, K = shape["num_hidden_layers"], shape["num_experts_per_tok"]
    tokens, expert = out["decoded"], out["expert_bytes"]
    decode_tps = tokens / out["decode_s"]
    missed = (s["disk_bytes"] - first["disk_bytes"]) / tokens  # bytes read from disk per decoded token
    hit = max(0.0, L * K * expert - missed)  # the rest of the chosen experts' bytes come from memory
    bound_s = missed / (disk * 1e9) + hit / (ram * 1e9)
    hits = s["tiers"][0]["hits"] - first["tiers"][0]["hits"]
    misses = s["tiers"][0]["misses"] - first["tiers"][0]["misses"]
    summary = {
        "decode_tokens_per_s": decode_tps, "bound_tokens_per_s": 1 / bound_s, "of_bound": decode_tps * bound_s,
        "prefill_s": out["prefill_s"], "load_s": out["load_s"], "peak_rss_gib": out["peak_rss"] / 2**30,
        "budget_gib": out["budget"] / 2**30, "decode_hit_rate": hits / max(1, hits + misses),
        "missed_gb_per_token": missed / 1e9, "hit_gb_per_token": hit / 1e9, "disk_gbs": disk, "ram_gbs": ram,
        "prefetch_accuracy": s["prefetch_accuracy"], "stall_s": s["stall_s"], "expert_mib": expert / 2**20,
    }
    print(json.dumps(summary, indent=1))
    print(f"load {out['load_s']:.1f} s; first token of a 16-token prompt, cold: {out['prefill_s']:.1f} s")
    print(f"decode {decode_tps:.3f} tokens/s over {tokens} tokens = {decode_tps * bound_s:.0%} of the bound "
          f"({1 / bound_s:.3f} tokens/s: {missed / 1e9:.2f} GB/token from disk at {disk:.2f} GB/s + "
          f"{hit / 1e9:.2f} GB/token from memory at {ram:.1f} GB/s)")
    print(f"peak RSS {out['peak_rss'] / 2**30:.2f} GiB with a {out['budget'] / 2**30:.1f} GiB expert budget; "
          f"decode hit rate {summary['decode_hit_rate']:.1%}; prefetch accuracy {s['prefetch_accuracy']:.1%}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "run": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
