"""Hub ids: `--model mistralai/Mixtral-8x7B-v0.1[@revision]` through `huggingface_hub`.

A snapshot already in the Hugging Face cache is used as it is (offline when HF_HUB_OFFLINE=1);
otherwise only the files smoe reads are downloaded — config, tokenizer files and safetensors
weights of ONE layout (the hub's `model-*.safetensors`, else Mistral's `consolidated`), never
pickles (`*.bin`, `*.pt`, `*.pth`) — with huggingface_hub's progress bars, resuming a partial
download. A local directory of the same name always wins (formats.locate).
"""

from __future__ import annotations

import re
from pathlib import Path

from smoe.errors import CheckpointError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
METADATA = ["config.json", "params.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "tokenizer.model.v*", "tekken.json"]
HUB_WEIGHTS = ["model*.safetensors", "model.safetensors.index.json"]
MISTRAL_WEIGHTS = ["consolidated*.safetensors"]
NEVER = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.gguf", "*.onnx", "*.h5", "*.msgpack", "original/*"]


def is_hub_id(text: str) -> bool:
    return HUB_ID.match(text) is not None and not text.startswith(("./", "../", "/"))


def download(spec: str) -> Path:
    """The snapshot directory of a hub id, from the cache or downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf

    m = HUB_ID.match(spec)
    repo, revision = m["repo"], m["revision"]
    offline = constants.HF_HUB_OFFLINE
    try:  # a snapshot already in the cache is used as it is, without asking the hub
        return Path(snapshot_download(repo, revision=revision, allow_patterns=METADATA + HUB_WEIGHTS + MISTRAL_WEIGHTS,
                                      ignore_patterns=NEVER, local_files_only=True))
    except (hf.LocalEntryNotFoundError, OSError, ValueError):
        pass
    try:
        patterns = METADATA + (HUB_WEIGHTS + MISTRAL_WEIGHTS if offline else _weight_patterns(repo, revision))
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=NEVER,
                                      local_files_only=offline))
    except hf.LocalEntryNotFoundError:
        if offline:
            raise CheckpointError(
                f"{spec}: no local directory of that name, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                "and HF_HUB_OFFLINE=1 forbids downloading it; run once without HF_HUB_OFFLINE, or pass a local "
                "directory") from None
        raise CheckpointError(f"{spec}: no local directory of that name, not in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}), and the hub cannot be reached to download it; "
                              "check the path or the network") from None
    except hf.GatedRepoError:
        raise CheckpointError(f"{spec}: a gated model; accept its terms on huggingface.co and log in "
                              "(hf auth login)") from None
    except hf.RepositoryNotFoundError:
        raise CheckpointError(f"{spec}: no such model on the Hugging Face hub (a private one needs hf auth login), "
                              "and no local directory of that name") from None
    except hf.RevisionNotFoundError:
        raise CheckpointError(f"{spec}: the model has no revision {revision!r}") from None
    except (hf.HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{spec}: download failed ({e}); run again to resume it") from None
    except Exception as e:  # the HTTP client's own errors (no network, DNS, TLS) are not OSErrors
        raise CheckpointError(f"{spec}: no local directory of that name, not in the Hugging Face cache, and the hub "
                              f"cannot be reached ({type(e).__name__}: {e}); check the path or the network, or set "
                              "HF_HUB_OFFLINE=1 to use only the cache") from None


def _weight_patterns(repo: str, revision: str | None) -> list[str]:
    """One layout's weights: the hub's when the repository has them (Mixtral's repos carry
    both), else Mistral's consolidated files."""
    from huggingface_hub import HfApi

    files = [f.rfilename for f in HfApi().model_info(repo, revision=revision).siblings or []]  # one request
    hub_layout = any(f.startswith("model") and f.endswith(".safetensors") and "/" not in f for f in files)
    return HUB_WEIGHTS if hub_layout else MISTRAL_WEIGHTS
