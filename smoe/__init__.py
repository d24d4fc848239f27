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
from smoe.generate import Engine, GenerationResult, TextPiece, generate, stream_generate
from smoe.loader import LoadOptions, gguf_in_place_for, load_model, model_path
from smoe.options import DEFAULT_CACHE_POLICY, DEMO_MODEL, LoraSpec, OffloadSpec, QuantSpec, parse_dtype
from smoe.sampling import SamplingParams
from smoe.weights import parse_quant

__all__ = [
    "load", "generate", "stream_generate", "Engine", "GenerationResult", "TextPiece", "SamplingParams",
    "ModelConfig", "SmoeError", "DEMO_MODEL", "QuantSpec", "OffloadSpec", "LoraSpec",
]
__version__ = "0.1.0"


def load(
    path: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    tokenizer_backend: str | None = None,
    pack: bool | None = None,
    adapter: str | Path | None = None,
    quant: str | QuantSpec | None = None,
    progress: bool = False,
    max_memory: int | str | None = None,
    cache_policy: str = DEFAULT_CACHE_POLICY,
    expert_profile: str | Path | None = None,
    prefetch: bool = True,
    max_cpu_memory: int | str = 0,
    compile: bool = False,
    gguf_in_place: bool | None = None,
):
    """Load a checkpoint directory -> (model, tokenizer).

    path=None loads the bundled demo model. dtype: 'fp32', 'bf16', 'fp16' or a torch dtype
    (default: the checkpoint's own). A directory without tokenizer files loads with
    tokenizer=None (prompts are then lists of token ids).

    pack: the inference layout — experts stacked (smoe/experts.py) and, on the CPU, linear
    weights repacked for the first backend that takes each (smoe/kernels/: the native kernels,
    aten's int4 kernel, oneDNN). Default: on. A packed model cannot
    be trained or saved; load with pack=False for that.

    adapter: a LoRA adapter directory in PEFT format (smoe/lora.py) to apply.

    quant: quantize the attention and expert weights at load (smoe/quantize.py): 'int8'
    (per output channel) or 'int4' (groups of 64 input columns, 4.5 bits per weight like
    llama.cpp's Q4_0; 'int4-g32', 'int4-g128', 'int4-g256' for other groups), or a QuantSpec.
    The output head becomes int8 too unless it is tied to the embeddings ('+keephead' keeps
    it, e.g. 'int4-g32+keephead'). A checkpoint written by `smoe quantize` loads quantized
    without it. progress: show progress bars while loading.

    max_memory: offload the experts (smoe/offload.py): keep at most this many bytes of them
    on the device ('6GiB', '512MiB' or a number), read the rest from the checkpoint when a
    token needs them. cache_policy 'lru' or 'lfu'; expert_profile: a `smoe profile` file whose
    most used experts are pinned; prefetch: guess and load the next layer's experts in the
    background; max_cpu_memory: a RAM tier between disk and a GPU. The store, with its
    statistics, is `model.expert_store`.

    compile: the inference layout that torch.compile sees through (stacked, unpacked experts;
    plain linears), for generate(..., compile=True), which compiles the decode step whole.

    gguf_in_place: a `.gguf` file's quantized tensors used as the file holds them (memory-mapped,
    nothing converted; smoe/ggml.py; the native kernels multiply the blocks as they are). None
    (default): in place whenever the file's experts are in block formats and nothing asked for
    needs a converted checkpoint (quant, max_memory, adapter, compile, a device other than the
    CPU); False: convert the file once to a bf16 checkpoint (cached); True: in place or an error.

    The order in which these transforms apply is documented in smoe/loader.py.
    """

    if max_memory is None and (expert_profile is not None or cache_policy != DEFAULT_CACHE_POLICY):
        raise SmoeError("an expert profile or cache policy needs offloading: give max_memory (--max-memory)")
    offload = None if max_memory is None else OffloadSpec(
        max_memory, policy=cache_policy, profile=expert_profile, prefetch=prefetch, max_cpu_memory=max_cpu_memory)
    options = LoadOptions(
        dtype=parse_dtype(dtype), device=str(device), allow_pickle=allow_pickle,
        quant=parse_quant(quant) if isinstance(quant, str) else quant, offload=offload,
        adapter=None if adapter is None else Path(adapter), pack=True if pack is None else pack,
        tokenizer_backend=tokenizer_backend, progress=progress, compile=compile, gguf_in_place=gguf_in_place,
    )
    return load_model(model_path(path, gguf_in_place_for(path, options)), options)
