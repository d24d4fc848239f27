"""Loading a model: one function, the transforms in one defined order (gpt-fast's
`_load_model` is the pattern). Options arrive typed (smoe/options.py); nothing below
re-parses a string.

    1. build    the Transformer on `meta`, memory-map the checkpoint, assign the tensors
                (checkpoint.load_model_deferred); with offloading the experts stay unread
    2. offload  each layer's experts -> OffloadedExperts over one ExpertStore; the steps
                below reach offloaded experts through the same methods and are applied to
                each expert as it loads (smoe/offload.py)
    3. quantize attention linears -> Int8Linear / Int4Linear, experts.map_experts(...)
                (smoe/quantize.py); a quantized checkpoint arrives quantized from step 1
    4. adapter  LoRA wrappers from a PEFT adapter directory (smoe/lora.py), over plain or
                quantized linears
    5. layout   the inference layout (`pack`): experts.for_inference(pack) stacks the experts
                ([E, 2F, H] / [E, H, F]; experts with LoRA adapters stay a list) in the native
                kernels' kinds where this CPU runs them (smoe/native.py), else oneDNN-packed
                (int4: aten's int4pack layout for this CPU, smoe/quantize.py); attention and
                head linears likewise (native_linears, aten_int4_linears, then pack_linears for
                the rest), the file pages released (smoe/packing.py). With `compile` the experts
                are stacked unpacked and the linears stay plain: oneDNN's packed tensors are
                opaque to torch.compile, which packs the weights of a compiled decode step
                itself (generate.py)
    6. start    the expert store measures an expert, checks the budget, pins a profile

Each step only swaps modules; none looks at what an earlier one produced. A new transform
goes where its inputs exist: after 3 if it needs quantized weights, before 5 if it needs
per-expert modules (5 is the last step that changes the experts).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from smoe.errors import SmoeError
from smoe.options import OffloadSpec, QuantSpec


@dataclass(frozen=True)
class LoadOptions:
    dtype: torch.dtype | None = None  # None: the checkpoint's own
    device: str = "cpu"
    allow_pickle: bool = False
    quant: QuantSpec | None = None
    offload: OffloadSpec | None = None
    adapter: Path | None = None
    pack: bool = True  # the inference layout; False: the plain model, trainable and saveable
    compile: bool = False  # the inference layout torch.compile sees through: experts stacked unpacked, linears plain
    tokenizer_backend: str | None = None
    progress: bool = False
    parallel: object = None  # a parallel.ParallelSpec: this process's share of the model (under torchrun)


def model_path(path: str | Path | None) -> Path:
    """The checkpoint directory to load: `path` (a directory, a hub id `org/name[@revision]` or a
    `.gguf` file: smoe/formats), or the bundled demo model when None."""
    from smoe import DEMO_MODEL
    from smoe.errors import CheckpointError

    if path is not None:
        from smoe.formats import resolve

        return resolve(path)
    if not (DEMO_MODEL / "config.json").exists():
        raise CheckpointError("no model given and the bundled demo model is not installed yet; "
                              "pass a checkpoint directory (smoe.load('path/to/model'), or --model DIR)")
    return DEMO_MODEL


def load_model(path: Path, options: LoadOptions):
    """(model, tokenizer) from a checkpoint directory, transformed as `options` ask."""
    from smoe.checkpoint import load_model_deferred
    from smoe.tokenizer import load_tokenizer

    offload = options.offload
    if offload is not None and options.adapter is not None:
        raise SmoeError("a LoRA adapter cannot be applied to offloaded experts yet; merge it first "
                        "(smoe lora merge) and offload the merged checkpoint")
    if options.compile and (offload is not None or options.adapter is not None):
        raise SmoeError("compile does not combine with offloaded experts or a LoRA adapter yet (their experts "
                        "are read on the host); drop --compile, or merge the adapter first (smoe lora merge)")
    if options.parallel is not None and (offload is not None or options.compile):
        raise SmoeError("--parallel does not combine with offloaded experts or --compile yet")
    defer = offload is not None or options.parallel is not None
    model, expert_sources = load_model_deferred(path, dtype=options.dtype, device=options.device,
                                                allow_pickle=options.allow_pickle, defer_experts=defer)
    if options.parallel is not None:  # this rank's share; experts it does not hold are never read
        from smoe import parallel

        rank, world = parallel.init()
        parallel.parallelize(model, options.parallel, parallel.make_mesh(options.parallel, rank, world),
                             expert_sources)
        expert_sources = {}
    if offload is not None:
        from smoe.offload import offload_experts

        offload_experts(model, expert_sources, offload)
    if options.quant is not None:
        from smoe.quantize import quantize_model

        if model.config.quantization:
            raise SmoeError(f"{path}: the checkpoint is already quantized "
                            f"({model.config.quantization['bits']} bits); drop the quantization option")
        quantize_model(model, options.quant, progress=options.progress)
    if options.adapter is not None:
        from smoe.lora import load_adapter

        load_adapter(model, options.adapter)
        model.requires_grad_(False)
    if options.pack or options.compile:
        from smoe import native
        from smoe.fsutil import trim_heap
        from smoe.packing import pack_linears, release_mmap
        from smoe.quantize import aten_int4_linears

        # the native kernels are custom ops with fake impls: a compiled step calls them too
        use_native = model.dtype == torch.bfloat16 and options.device == "cpu" and native.available()
        if model.dtype == torch.bfloat16 and options.device == "cpu":
            native.note_fallback()
        from tqdm import tqdm

        # stacking reads the experts' pages of the checkpoint: most of a large model's load time
        for layer in tqdm(model.layers, desc="loading layers", unit="layer", disable=not options.progress,
                          delay=1.0, file=sys.stderr):
            layer.moe.experts = layer.moe.experts.for_inference(pack=not options.compile or use_native)
        if not options.compile or use_native:
            native.native_linears(model)
        if not options.compile:  # decode steps: one native call per layer (a compiled step traces the modules)
            native.native_blocks(model)
        if not options.compile:  # a compiled step packs its own weights (inductor's freezing)
            aten_int4_linears(model)  # int4 the native kernels did not take: aten's layout for this CPU
            pack_linears(model)
        release_mmap(model)
        trim_heap()  # the stacking's freed temporaries
    if offload is not None:
        from smoe.offload import start_store

        start_store(model, offload, progress=options.progress)
    tokenizer = load_tokenizer(path, backend=options.tokenizer_backend) if Path(path).is_dir() else None
    return model, tokenizer
