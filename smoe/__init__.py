"""smoe: a readable, fast engine for Mixtral-family sparse mixture-of-experts models.

    import smoe
    model, tokenizer = smoe.load("path/to/checkpoint")      # or smoe.load() for the demo model
    result = smoe.generate(model, tokenizer, "The capital of France is", max_tokens=32)
    print(result.text, result.decode_tokens_per_s)
"""

from __future__ import annotations

from pathlib import Path

import torch

from smoe.config import ModelConfig
from smoe.errors import SmoeError
from smoe.generate import Engine, GenerationResult, generate, stream_generate
from smoe.sampling import SamplingParams

__all__ = [
    "load", "generate", "stream_generate", "Engine", "GenerationResult", "SamplingParams",
    "ModelConfig", "SmoeError", "DEMO_MODEL",
]
__version__ = "0.1.0"

DEMO_MODEL = Path(__file__).parent / "assets" / "demo"


def load(
    path: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    tokenizer_backend: str | None = None,
    pack: bool | None = None,
    adapter: str | Path | None = None,
    quant: str | None = None,
    progress: bool = False,
    max_memory: int | str | None = None,
    cache_policy: str = "lru",
    expert_profile: str | Path | None = None,
    prefetch: bool = True,
    max_cpu_memory: int | str = 0,
):
    """Load a checkpoint directory -> (model, tokenizer).

    path=None loads the bundled demo model. dtype: 'fp32', 'bf16', 'fp16' or a torch dtype
    (default: the checkpoint's own). A directory without tokenizer files loads with
    tokenizer=None (prompts are then lists of token ids).

    pack: store linear weights in oneDNN's blocked layout for fast CPU inference
    (smoe/packing.py). Default: on when the device is the CPU. A packed model cannot be
    trained or saved; load with pack=False for that.

    adapter: a LoRA adapter directory in PEFT format (smoe/lora.py) to apply.

    quant: quantize the attention and expert weights at load (smoe/quantize.py): 'int8'
    (per output channel) or 'int4' (groups of 32 input columns; 'int4-g64', 'int4-g128',
    'int4-g256' for larger groups). A checkpoint written by `smoe quantize` loads quantized
    without it. progress: show a progress bar while quantizing.

    max_memory: offload the experts (smoe/offload.py): keep at most this many bytes of them
    on the device ('6GiB', '512MiB' or a number), read the rest from the checkpoint when a
    token needs them. cache_policy 'lru' or 'lfu'; expert_profile: a `smoe profile` file whose
    most used experts are pinned; prefetch: guess and load the next layer's experts in the
    background; max_cpu_memory: a RAM tier between disk and a GPU. The store, with its
    statistics, is `model.expert_store`.
    """
    from smoe.checkpoint import load_model_deferred
    from smoe.errors import CheckpointError
    from smoe.tokenizer import load_tokenizer

    if path is None:
        if not (DEMO_MODEL / "config.json").exists():
            raise CheckpointError(
                "no model given and the bundled demo model is not installed yet; "
                "pass a checkpoint directory (smoe.load('path/to/model'), or --model DIR)"
            )
        path = DEMO_MODEL
    offload = max_memory is not None
    if offload and adapter is not None:
        raise SmoeError("a LoRA adapter cannot be applied to offloaded experts yet; merge it first "
                        "(smoe lora merge) and offload the merged checkpoint")
    if not offload and (expert_profile is not None or cache_policy != "lru"):
        raise SmoeError("an expert profile or cache policy needs offloading: give max_memory (--max-memory)")
    model, expert_weights = load_model_deferred(path, dtype=dtype, device=device, allow_pickle=allow_pickle,
                                                defer_experts=offload)
    if pack is None:
        pack = torch.device(device).type == "cpu"
    prepare = []  # what an offloaded expert goes through when loaded, as the resident ones do here
    if quant is not None:
        from smoe.quantize import parse_quant, quantize_expert

        bits, group_size = parse_quant(quant)
        if model.config.quantization:
            raise SmoeError(f"{path}: the checkpoint is already quantized "
                            f"({model.config.quantization['bits']} bits); drop quant")
        prepare.append(lambda m: quantize_expert(m, bits, group_size))
    if pack and offload:
        from smoe.packing import fuse_expert

        prepare.append(fuse_expert)
    if offload:
        from smoe.offload import offload_experts

        def prepare_expert(module):
            for step in prepare:
                module = step(module)
            return module

        offload_experts(model, expert_weights, max_memory, policy=cache_policy, prefetch=prefetch,
                        profile=expert_profile, prepare=prepare_expert, max_cpu_memory=max_cpu_memory,
                        progress=progress)
    if quant is not None:  # the resident weights (all of them without offloading)
        from smoe.quantize import quantize_model

        quantize_model(model, bits, group_size, progress=progress)
    if adapter is not None:
        from smoe.lora import load_adapter

        load_adapter(model, adapter)
        model.requires_grad_(False)
    if pack:
        from smoe.packing import pack_linears, release_mmap

        pack_linears(model)
        release_mmap(model)
    tokenizer = load_tokenizer(path, backend=tokenizer_backend) if Path(path).is_dir() else None
    return model, tokenizer
