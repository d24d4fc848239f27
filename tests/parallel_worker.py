"""One rank of a multi-process test: tests/test_parallel.py starts N of these with the variables
torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as `torchrun ... -m smoe` would run.

    python tests/parallel_worker.py TASK CHECKPOINT SPEC OUT_PREFIX   -> OUT_PREFIX.RANK.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)


def lora_grads(model, prompts) -> dict[str, list]:
    """One LoRA training step: every adapter's A and B set from its name (global expert ids, so
    that ranks and one process agree), loss = next-token cross-entropy on the prompts ->
    {"layer.module(.expert).A|B": gradient} for the adapters this process holds."""
    from smoe.lora import LoraSpec, apply_lora, lora_modules

    apply_lora(model, LoraSpec(rank=4, targets=("attention", "experts")))
    for name, m in lora_modules(model).items():
        key = global_name(model, name)
        g = torch.Generator().manual_seed(sum(ord(c) * 31**i for i, c in enumerate(key)) % 2**31)
        with torch.no_grad():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    model.train()
    ids = torch.tensor(prompts)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {}
    for name, m in lora_modules(model).items():
        for ab in ("A", "B"):
            w = getattr(m, f"lora_{ab}").weight
            grads[f"{global_name(model, name)}.{ab}"] = (w.grad if w.grad is not None else torch.zeros_like(w)).tolist()
    return grads


def global_name(model, name: str) -> str:
    """layers.0.moe.experts.experts.1.w1 (a rank's local expert 1) -> layers.0.moe.experts.5.w1."""
    parts = name.split(".")
    if "experts" in parts and parts.count("experts") == 2:
        i = parts.index("experts")
        sharded = model.layers[int(parts[1])].moe.experts
        parts = parts[: i + 1] + [str(sharded.first + int(parts[i + 2]))] + parts[i + 3 :]
    return ".".join(parts)


def main() -> None:
    task, checkpoint, spec, out = sys.argv[1:5]
    import torch.distributed as dist

    import smoe
    from smoe.loader import LoadOptions, load_model
    from smoe.parallel import ParallelSpec, expert_bytes

    rank = int(os.environ["RANK"])
    result: dict = {}
    try:
        # "bytes": the plain layout, whose parameters are the expert weights as loaded
        from smoe.options import QuantSpec

        quant = QuantSpec(int(os.environ["QUANT_BITS"])) if os.environ.get("QUANT_BITS") else None
        options = LoadOptions(dtype=torch.float32, parallel=ParallelSpec.parse(spec), quant=quant,
                              pack=task not in ("bytes", "grads"),
                              gguf_in_place=True if checkpoint.endswith(".gguf") else None)
        model, _ = load_model(Path(checkpoint), options)
        prompts = json.loads(os.environ["PROMPTS"])
        if task == "run":  # logits, then generation
            with torch.inference_mode():
                result["logits"] = model(torch.tensor(prompts)).tolist()
            runs = smoe.generate(model, None, prompts, max_tokens=12, ignore_eos=True)
            result["tokens"] = [r.token_ids for r in runs]
            result["alone"] = smoe.generate(model, None, prompts[0], max_tokens=12, ignore_eos=True).token_ids
            seed = 7
            result["sampled"] = smoe.generate(model, None, prompts[0], max_tokens=12, ignore_eos=True,
                                              temperature=1.0, seed=seed).token_ids
        elif task == "grads":
            result["grads"] = lora_grads(model, prompts)
        elif task == "bytes":
            result["expert_bytes"] = expert_bytes(model)
        elif task == "die":
            if rank == 1:
                os._exit(3)  # a rank that dies before the first collective
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    model(torch.tensor(prompts))
                result["error"] = None
            except Exception as e:  # what the survivors see
                result["error"] = f"{type(e).__name__}: {e}"
            result["after_s"] = time.perf_counter() - started
        if task != "die":  # the survivors of "die" have no partner left to wait for
            dist.barrier()
    except Exception as e:
        result["failed"] = f"{type(e).__name__}: {e}"
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
