"""Shared fixtures: tiny random Mixtral checkpoints saved by transformers, the real v1 tokenizer;
the CPU capabilities this machine can run tests under."""

from __future__ import annotations

import functools
import getpass
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

# aten's x86 CPU capabilities (ATEN_CPU_CAPABILITY), lowest first: what its kernels are compiled for
# and, for int4, which byte layout _convert_weight_to_int4pack_for_cpu makes
ATEN_CAPABILITIES = ("default", "avx2", "avx512")
# oneDNN picks its instructions by itself: capped with aten's, as on a CPU that has no more (aten at
# avx2 beside oneDNN's AMX kernels fails in bf16 attention: "pack_vnni2 is only supported when avx512
# is supported", seen on a Sapphire Rapids VM)
_ONEDNN_ISA = {"default": "SSE41", "avx2": "AVX2"}


@functools.cache
def cpu_capabilities() -> tuple[str, ...]:
    """The ATEN_CPU_CAPABILITY values this CPU runs, lowest first (asked of a torch started
    without the variable)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    best = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip().lower()
    if best in ATEN_CAPABILITIES:
        return ATEN_CAPABILITIES[: ATEN_CAPABILITIES.index(best) + 1]
    return ("default", best) if best != "default" else ("default",)  # aarch64: default, sve...


def current_capability() -> str:
    return torch.backends.cpu.get_cpu_capability().lower()


# inductor's on-disk cache does not key on ATEN_CPU_CAPABILITY (smoe/generate.py's compiled_decode
# states the vector width; the tests' own torch.compile calls get a cache per capability)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) /
                                                     f"torchinductor_{getpass.getuser()}_{current_capability()}"))


def capability_env(capability: str, **more: str) -> dict[str, str]:
    """The environment of a subprocess that runs under `capability`."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, **more}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if capability in _ONEDNN_ISA and capability != cpu_capabilities()[-1]:
        env["ONEDNN_MAX_CPU_ISA"] = _ONEDNN_ISA[capability]
    return env

BASE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=256, rope_theta=10000.0,
)


def hf_model(seed: int = 0, **overrides):
    """A transformers MixtralForCausalLM with random weights from a fixed seed."""
    from transformers import MixtralConfig, MixtralForCausalLM

    kwargs = {**BASE, **overrides}
    rope_theta = kwargs.pop("rope_theta")
    config = MixtralConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    # transformers initialises norms to ones; perturb them so a swapped norm cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(seed=0, **config) -> directory of a saved transformers checkpoint (cached per session)."""
    made: dict[str, Path] = {}

    def make(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
        key = json.dumps([seed, str(dtype), sorted(overrides.items())], default=str)
        if key not in made:
            path = tmp_path_factory.mktemp("ckpt")
            hf_model(seed, **overrides).to(dtype).save_pretrained(path)
            made[key] = path
        return made[key]

    return make


def v1_tokenizer_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def sentencepiece_bpe_to_tokenizer_json(model_path: Path, out: Path) -> Path:
    """Write the tokenizers (HF) equivalent of a SentencePiece BPE model with add_dummy_prefix
    and the identity normalizer, as Mistral's v1 tokenizer is.

    BPE merges are ranked by the score of the merged piece, as SentencePiece ranks them.
    (transformers 5.23's SentencePieceExtractor ranks them by id instead, which breaks
    whitespace runs: Mistral scores its '▁▁', '▁▁▁' pieces -1e9, last of all.)
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    ranked = []
    for piece, i in vocab.items():
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-sp.GetScore(i), i, vocab[left], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(out))
    return out


@pytest.fixture(scope="session")
def v1_tokenizer_json(tmp_path_factory) -> Path:
    return sentencepiece_bpe_to_tokenizer_json(v1_tokenizer_path(), tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, v1_tokenizer_json) -> Path:
    """A tiny random model with the real 32000-token v1 vocabulary and its tokenizer files."""
    import shutil

    path = tmp_path_factory.mktemp("chat")
    hf_model(7, vocab_size=32000, hidden_size=32, num_hidden_layers=2, max_position_embeddings=512).save_pretrained(path)
    shutil.copy(v1_tokenizer_path(), path / "tokenizer.model")
    return path


def peft_logits(checkpoint: Path, adapter: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of transformers' model with the adapter loaded by peft, logits without it)."""
    import peft
    from transformers import MixtralForCausalLM

    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(checkpoint), adapter).eval()
        plain = MixtralForCausalLM.from_pretrained(checkpoint).eval()
        return adapted(ids).logits, plain(ids).logits
