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
        options = LoadOptions(dtype=torch.float32, parallel=ParallelSpec.parse(spec), pack=task != "bytes")
        model, _ = load_model(Path(checkpoint), options)
        prompts = json.loads(os.environ["PROMPTS"])
        if task == "logits":
            with torch.inference_mode():
                result["logits"] = model(torch.tensor(prompts)).tolist()
        elif task == "generate":
            runs = smoe.generate(model, None, prompts, max_tokens=12, ignore_eos=True)
            result["tokens"] = [r.token_ids for r in runs]
            result["alone"] = smoe.generate(model, None, prompts[0], max_tokens=12, ignore_eos=True).token_ids
            seed = 7
            result["sampled"] = smoe.generate(model, None, prompts[0], max_tokens=12, ignore_eos=True,
                                              temperature=1.0, seed=seed).token_ids
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
        dist.barrier() if task != "die" else None
    except Exception as e:
        result["failed"] = f"{type(e).__name__}: {e}"
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
