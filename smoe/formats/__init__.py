"""Readers for what people download: Hugging Face hub ids and the HF cache (hub.py), GGUF
files (gguf.py). `locate(spec)` turns whatever a user passed as a model into a checkpoint
directory smoe loads."""

from __future__ import annotations

from pathlib import Path

from smoe.formats import hub
from smoe.formats.gguf import cached_conversion


def locate(spec: str | Path, convert_gguf: bool = True) -> Path:
    """A local path wins; then a `.gguf` file (converted once into a cache directory, or itself
    with convert_gguf=False: the loader then uses its tensors in place); then a hub id
    `org/name[@revision]` (the HF cache, or a download of the files smoe reads)."""
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return cached_conversion(path) if convert_gguf else path
    if path.exists() or not hub.is_hub_id(str(spec)):
        return path
    return hub.download(str(spec))
