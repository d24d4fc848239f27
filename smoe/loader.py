"""Loading a model: one function, the transforms in one defined order (gpt-fast's
`_load_model` is the pattern). Options arrive typed (smoe/options.py); nothing below
re-parses a string.

    1. build    the Transformer on `meta`, memory-map the checkpoint, assign the tensors
                (build_model, over checkpoint.py's reading and validation); with offloading
                the experts stay unread
    2. offload  each layer's experts -> OffloadedExperts over one ExpertStore; the steps
                below reach offloaded experts through the same methods and are applied to
                each expert as it loads (smoe/offload.py)
    3. quantize attention linears -> Int8Linear / Int4Linear, experts.map_experts(...)
                (smoe/quantize.py); a quantized checkpoint arrives quantized from step 1
    4. adapter  LoRA wrappers from a PEFT adapter directory (smoe/lora.py), over plain or
                quantized linears
    5. layout   the inference layout (`pack`): the backend list for this load is built once
                (smoe/kernels/: the native kernels where this CPU runs them, aten's int4
                kernel, oneDNN, then each format's plain PyTorch reference), from the device,
                the dtype and `compile`; experts.for_inference(kernels) stacks the experts
                ([E, 2F, H] / [E, H, F]; experts with LoRA adapters stay a list) in the first
                backend's kind that takes them; the attention and head linears likewise
                (kernels.repack_linears); a backend's decode-step plan is attached; the file
                pages are released. With `compile` oneDNN and aten's int4 layout are not asked
                (torch.compile packs a compiled step's weights itself) and no plan is attached
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
from torch import nn
from tqdm import tqdm

from smoe import kernels, parallel
from smoe.checkpoint import is_expert_weight, load_state, read_checkpoint, stored_dtype, stored_format
from smoe.config import ModelConfig
from smoe.errors import CheckpointError, SmoeError
from smoe.experts import Expert, ExpertList, StackedExperts
from smoe.formats import gguf, locate
from smoe.fsutil import trim_heap
from smoe.ggml import DEQUANTIZERS, GGMLEmbedding, GGMLLinear, StackedGGML, row_bytes
from smoe.kernels.ops import note_fallback
from smoe.lora import load_adapter, read_adapter_config
from smoe.model import HalfCacheAttention, Transformer
from smoe.offload import offload_experts, start_store
from smoe.options import DEMO_MODEL, EXPERT_TARGETS, OffloadSpec, QuantSpec, parse_dtype
from smoe.quantize import quantize_model
from smoe.tokenizer import load_tokenizer


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
    gguf_in_place: bool | None = None  # a .gguf file's blocks used as they are; None: where it can (gguf_in_place_for)


def gguf_in_place_for(path: str | Path | None, options: LoadOptions) -> bool:
    """Whether a `.gguf` file is used in place: as options.gguf_in_place says, else (None) whenever
    the load asks nothing that needs a converted checkpoint (--quant, --compile, a device other
    than the CPU) and the file's experts are in block formats
    (llama.cpp's quantized files; an F16 / BF16 file converts as before)."""
    if options.gguf_in_place is not None:
        return options.gguf_in_place
    if path is None or Path(path).suffix != ".gguf" or not Path(path).is_file():
        return False
    if options.quant or options.compile or options.device != "cpu":
        return False
    kinds = gguf.tensor_kinds(gguf.open_in_place(Path(path))[0])
    experts = [kind for name, kind in kinds.items() if name.endswith("_exps.weight")]
    return bool(experts) and all(kind in DEQUANTIZERS for kind in experts)


def model_path(path: str | Path | None, gguf_in_place: bool = False) -> Path:
    """The checkpoint directory to load: `path` (a directory, a hub id `org/name[@revision]` or a
    `.gguf` file: smoe/formats — converted, or the file itself with gguf_in_place), or the bundled
    demo model when None."""
    if path is not None:
        return locate(path, convert_gguf=not gguf_in_place)
    if not (DEMO_MODEL / "config.json").exists():
        raise CheckpointError("no model given and the bundled demo model is not installed yet; "
                              "pass a checkpoint directory (smoe.load('path/to/model'), or --model DIR)")
    return DEMO_MODEL


def build_model(path: str | Path, *, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                allow_pickle: bool = False, deferred: dict[str, torch.Tensor] | None = None) -> Transformer:
    """The plain model a checkpoint directory holds: built on `meta` (a quantized checkpoint's
    linears as its format's empty modules), its tensors memory-mapped and assigned, no copy.
    With a `deferred` dict the experts stay on `meta` and their weights go into it, as unread
    views of the files by parameter name (smoe/offload.py and parallel.py read them later)."""
    path = Path(path)
    config, stored = read_checkpoint(path, allow_pickle)
    dtype = parse_dtype(dtype) or stored_dtype(config, stored)
    with torch.device("meta"):
        model = Transformer(config)
    version = None
    if config.quantization:
        model.to(dtype)
        # a format this smoe does not know is refused before any reading
        fmt, version = stored_format(config, path)
        # the modules hold the current version of the format, and config.quantization now says
        # so: a stored older one is converted as it is read
        quantize_model(model, fmt.spec_from_config(config.quantization))
    sources = load_state(model, config, stored, path, dtype, device,
                         defer=is_expert_weight if deferred is not None else None, stored_version=version)
    if deferred is not None:
        deferred.update(sources)
    model.rope.reset_parameters(device=device)
    model.requires_grad_(False)
    model.eval()
    return model


def build_gguf_model(path: Path, *, dtype: torch.dtype | str | None = None,
                     opened: tuple[object, dict] | None = None, rotary_pairs: bool = True) -> Transformer:
    """The model of a GGUF file with its quantized tensors used in place: built on `meta` with each
    quantized matrix a GGMLLinear of the file's type and each layer's experts stacked as the file
    stacks them (StackedGGML: gate and up as two parts, down), then the file's tensors assigned —
    the blocks as views of its memory map, nothing dequantized but norms and routers (to `dtype`,
    default bf16). rotary_pairs: RoPE over llama.cpp's adjacent pairs, so that q/k keep the file's
    row order (views too); False reorders them to Hugging Face's halves (copies), for what reads
    q/k in that order (a LoRA adapter of q_proj / k_proj). These kinds are the PyTorch reference
    (smoe/ggml.py: a weight dequantized per product); inference_layout hands them to a backend that
    runs blocks (native).
    opened: what gguf.open_in_place(path) gave already (reading the header of Mixtral's file takes
    ~1.6 s)."""
    reader, hf = opened if opened is not None else gguf.open_in_place(path)
    config = ModelConfig.from_hf_dict(hf, source=str(path))
    dtype = parse_dtype(dtype) or torch.bfloat16
    kinds = gguf.tensor_kinds(reader)

    def quantized(name: str) -> str | None:
        kind = kinds.get(name)
        return kind if kind in DEQUANTIZERS else None

    with torch.device("meta"):
        model = Transformer(config).to(dtype)
        for i, layer in enumerate(model.layers):
            for gguf_name, attr in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                                    ("attn_output", "o_proj")):
                kind = quantized(f"blk.{i}.{gguf_name}.weight")
                if kind:
                    old = getattr(layer.attn, attr)
                    setattr(layer.attn, attr, GGMLLinear(old.in_features, old.out_features, kind))
            E, H, F_ = config.num_local_experts, config.hidden_size, config.intermediate_size
            part = {n: kinds[f"blk.{i}.{n}_exps.weight"] for n in ("ffn_gate", "ffn_up", "ffn_down")}
            if not all(k in DEQUANTIZERS for k in part.values()):
                raise CheckpointError(f"{path}: layer {i}'s experts are not all in block formats "
                                      f"({part}); convert the file instead (smoe convert)")
            gate_up = StackedGGML([(torch.empty(E, F_, row_bytes(part["ffn_gate"], H), dtype=torch.uint8),
                                    part["ffn_gate"]),
                                   (torch.empty(E, F_, row_bytes(part["ffn_up"], H), dtype=torch.uint8),
                                    part["ffn_up"])], H)
            down = StackedGGML([(torch.empty(E, H, row_bytes(part["ffn_down"], F_), dtype=torch.uint8),
                                 part["ffn_down"])], F_)
            layer.moe.experts = StackedExperts(gate_up, down, F_)
        head, embed = quantized("output.weight"), quantized("token_embd.weight")
        if head and not config.tie_word_embeddings:
            model.lm_head = GGMLLinear(config.hidden_size, config.vocab_size, head)
        if embed:  # the table stays in its blocks: a looked-up row is dequantized
            model.embed_tokens = GGMLEmbedding(config.vocab_size, config.hidden_size, embed, dtype)
    model.rope.pairs = rotary_pairs
    gguf.assign_in_place(model, reader, path, dtype)  # every tensor replaced: nothing is allocated for meta's
    model.rope.reset_parameters(device="cpu")
    if config.tie_word_embeddings and isinstance(model.embed_tokens, GGMLEmbedding):  # the head reads its blocks
        model.lm_head = GGMLLinear.of(model.embed_tokens.blocks, embed, config.hidden_size)
    elif config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    unread = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unread:
        raise CheckpointError(f"{path}: the file has no tensor for {unread[0]} (and {len(unread) - 1} more); "
                              "it is not a complete Llama/Mixtral model")
    model.requires_grad_(False)
    model.eval()
    return model


def load_model(path: Path, options: LoadOptions) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a checkpoint directory, transformed as `options` ask."""
    if Path(path).suffix == ".gguf" and Path(path).is_file():
        return load_gguf_in_place(Path(path), options)
    offload = options.offload
    if offload is not None and options.adapter is not None:
        raise SmoeError("a LoRA adapter cannot be applied to offloaded experts yet; merge it first "
                        "(smoe lora merge) and offload the merged checkpoint")
    if options.compile and (offload is not None or options.adapter is not None):
        raise SmoeError("compile does not combine with offloaded experts or a LoRA adapter yet (their experts "
                        "are read on the host); drop --compile, or merge the adapter first (smoe lora merge)")
    if options.parallel is not None and (offload is not None or options.compile):
        raise SmoeError("--parallel does not combine with offloaded experts or --compile yet")
    expert_sources = {} if offload is not None or options.parallel is not None else None
    model = build_model(path, dtype=options.dtype, device=options.device, allow_pickle=options.allow_pickle,
                        deferred=expert_sources)
    if options.parallel is not None:  # this rank's share; experts it does not hold are never read
        rank, world = parallel.init()
        parallel.parallelize(model, options.parallel, parallel.make_mesh(options.parallel, rank, world),
                             expert_sources)
        expert_sources = {}
    if offload is not None:
        offload_experts(model, expert_sources, offload)
    if options.quant is not None:
        if model.config.quantization:
            raise SmoeError(f"{path}: the checkpoint is already quantized "
                            f"({model.config.quantization['format']['name']}); drop the quantization option")
        quantize_model(model, options.quant, progress=options.progress)
    if options.adapter is not None:
        load_adapter(model, options.adapter)
        model.requires_grad_(False)
    if options.pack or options.compile:
        inference_layout(model, kernels.Target(options.device, model.dtype, options.compile), options.progress)
    if offload is not None:
        start_store(model, offload, progress=options.progress)
    tokenizer = load_tokenizer(path, backend=options.tokenizer_backend) if Path(path).is_dir() else None
    return model, tokenizer


def unstack_gguf_experts(model: nn.Module) -> None:
    """Each layer's experts, stacked as the GGUF file stacks them, as an ExpertList of Experts whose
    w1 / w3 / w2 are GGMLLinear views of the same blocks (nothing copied): what transforms that
    wrap one expert's linears (LoRA) take; the inference layout restacks them where it can."""
    for layer in model.layers:
        owner, attr = layer.moe, "experts"
        if isinstance(layer.moe.experts, parallel.ShardedExperts):  # a rank's share: unstack that
            owner = layer.moe.experts
        experts = getattr(owner, attr)
        if not (isinstance(experts, StackedExperts) and isinstance(experts.gate_up, StackedGGML)):
            continue
        H, F_ = experts.gate_up.in_features, experts.down.in_features
        with torch.device("meta"):
            unstacked = ExpertList([Expert(H, F_) for _ in range(len(experts))])
        for e, expert in enumerate(unstacked):
            expert.w1, expert.w3 = experts.gate_up.linears(e)
            expert.w2, = experts.down.linears(e)
        setattr(owner, attr, unstacked)


def gguf_expert_sources(model: nn.Module) -> dict[str, torch.Tensor]:
    """Offloading a GGUF file in place: each expert's blocks as views of the file by parameter name
    (`layers.L.moe.experts.E.w1.blocks`, what smoe/offload.py reads on a miss; unstack_gguf_experts
    cuts them out), each layer's experts left one Expert on `meta` of the file's types (the template)."""
    unstack_gguf_experts(model)
    sources = {}
    for i, layer in enumerate(model.layers):
        experts = layer.moe.experts
        sources.update({f"layers.{i}.moe.experts.{name}": t for name, t in experts.named_buffers()})
        layer.moe.experts = ExpertList([experts[0].to("meta")])
    return sources


def load_gguf_in_place(path: Path, options: LoadOptions) -> tuple[nn.Module, object]:
    """(model, tokenizer) of a GGUF file used in place (build_gguf_model): the inference layout
    asks the backends for its formats (the native kernels take GGML blocks as they are on the CPU,
    in bf16 or — llama.cpp's arithmetic, one op at a time — in fp32; elsewhere the PyTorch
    reference runs them); a LoRA adapter wraps them (single experts' views where it targets
    experts: unstack_gguf_experts); under --parallel each rank keeps its share (views of its
    experts' blocks; TP's slices copied); offloaded, the file's map is the disk tier
    (gguf_expert_sources); quantizing and compiling are not offered on it (gguf_in_place_for
    converts the file for those)."""
    asked = [name for name, on in (("--quant", options.quant), ("--compile", options.compile)) if on]
    if asked:
        raise SmoeError(f"{path}: {asked[0]} does not combine with a GGUF file used in place yet; drop it, or "
                        "let smoe convert the file (without --gguf-in-place)")
    if options.device != "cpu":
        raise SmoeError(f"{path}: a GGUF file is used in place on the CPU only so far; load it without "
                        f"--gguf-in-place to convert it for {options.device}")
    opened = gguf.open_in_place(path)
    # q/k stay in the file's row order (RoPE over its adjacent pairs), unless an adapter (which may read
    # q_proj / k_proj in Hugging Face's order) is applied
    model = build_gguf_model(path, dtype=options.dtype, opened=opened, rotary_pairs=options.adapter is None)
    if options.offload is not None and (options.parallel is not None or options.adapter is not None):
        raise SmoeError(f"{path}: offloaded experts do not combine with --parallel or a LoRA adapter yet")
    if options.offload is not None:  # the file's map is the disk tier: an expert's blocks are read on a miss
        offload_experts(model, gguf_expert_sources(model), options.offload)
    if options.parallel is not None:  # each rank keeps views of its experts' blocks (parallel._gguf_share)
        rank, world = parallel.init()
        parallel.parallelize(model, options.parallel, parallel.make_mesh(options.parallel, rank, world))
    if options.adapter is not None:
        if set(read_adapter_config(options.adapter).targets) & set(EXPERT_TARGETS):
            unstack_gguf_experts(model)  # LoRA wraps single experts' linears: views of the same blocks
        load_adapter(model, options.adapter)
        model.requires_grad_(False)
    if options.pack:
        inference_layout(model, kernels.Target(options.device, model.dtype, False, gguf=True), options.progress,
                         release=False)
        if model.dtype == torch.float32:  # llama.cpp's arithmetic: its products (native), its F16 KV cache
            for layer in model.layers:
                layer.attn = HalfCacheAttention.of(layer.attn)
    if options.offload is not None:
        start_store(model, options.offload, progress=options.progress)
    tokens = gguf.tokenizer_dir(path, opened[0])
    tokenizer = load_tokenizer(tokens, backend=options.tokenizer_backend) if tokens is not None else None
    return model, tokenizer


def inference_layout(model: nn.Module, target: kernels.Target, progress: bool = False,
                     release: bool = True) -> kernels.Kernels:
    """Step 5: the backend list for `target`, built once; the experts stacked and the linears
    repacked by the first backend that takes each; a decode-step plan; the checkpoint's pages
    let go (not with release=False: a GGUF file used in place is the weights' memory). The list,
    with what ran where, is kept as `model.kernels` (smoe info --kernels)."""
    chosen = kernels.for_load(target)
    if target.device == "cpu" and target.dtype == torch.bfloat16:
        note_fallback()  # one line when the native kernels do not run here, and why
    # stacking reads the experts' pages of the checkpoint: most of a large model's load time
    for layer in tqdm(model.layers, desc="loading layers", unit="layer", disable=not progress, delay=1.0,
                      file=sys.stderr):
        layer.moe.experts = layer.moe.experts.for_inference(chosen)
    chosen.repack_linears(model)
    chosen.plan_decode(model)
    if release:
        release_mmap(model)
    trim_heap()  # the stacking's freed temporaries
    model.kernels = chosen
    return chosen


def release_mmap(model: nn.Module) -> None:
    """Copy the tensors that still view the checkpoint's memory map (embeddings, norms,
    routers; quantized codes no backend repacked) into memory of their own, so the map — and
    the file pages it holds in the resident set — is released once the backends have replaced
    the large weights; a head tied to the embeddings is tied again where it still has a weight."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.untyped_storage().resizable():  # a view into a buffer we did not allocate
                setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b.layout == torch.strided and not b.untyped_storage().resizable():
                setattr(module, name, b.clone())
    if getattr(model.config, "tie_word_embeddings", False) and "weight" in model.lm_head._parameters:
        model.lm_head.weight = model.embed_tokens.weight
