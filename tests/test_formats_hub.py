"""Hub ids through huggingface_hub, offline, against a cache laid out as huggingface_hub lays it
out (models--org--name/{blobs,refs,snapshots}), built here: the model loads by id, a local
directory wins over an id, a missing id is a one-line error naming it and HF_HUB_OFFLINE, and
pickle files in a snapshot are never read."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import smoe
from smoe.formats.hub import is_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo: str, files: dict[str, bytes], ref: str = "main", commit: str = COMMIT) -> Path:
    """Store `files` as huggingface_hub does: content in blobs/<sha256>, the snapshot a tree of
    relative symlinks, refs/<ref> naming the commit. -> the snapshot directory."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


def run(cache: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    return subprocess.run([sys.executable, "-m", "smoe", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, chat_checkpoint):
    cache = tmp_path_factory.mktemp("hf-cache")
    files = {f.name: f.read_bytes() for f in chat_checkpoint.iterdir() if f.is_file()}
    # pickles beside the safetensors: garbage, so that reading one would fail loudly
    add_to_cache(cache, "mistralai/Tiny-Mixtral", {**files, "pytorch_model.bin": b"not a pickle", "extra/x.pt": b"no"})
    add_to_cache(cache, "mistralai/Tiny-Mixtral", files, ref="v1", commit="f" * 40)
    only_pickles = {k: v for k, v in files.items() if not k.endswith(".safetensors")}
    add_to_cache(cache, "someone/pickled", {**only_pickles, "pytorch_model.bin": b"not a pickle"})
    return cache


def test_a_cached_model_loads_by_id_offline(cache, chat_checkpoint):
    args = ["generate", "--prompt", "Bonjour", "-n", "6", "--ignore-eos", "--json"]
    by_id = run(cache, *args, "--model", "mistralai/Tiny-Mixtral")
    assert by_id.returncode == 0, by_id.stderr
    local = run(cache, *args, "--model", str(chat_checkpoint))
    assert json.loads(by_id.stdout)["token_ids"] == json.loads(local.stdout)["token_ids"]
    pinned = run(cache, *args, "--model", "mistralai/Tiny-Mixtral@v1")
    assert json.loads(pinned.stdout)["token_ids"] == json.loads(local.stdout)["token_ids"]
    # the Python API resolves ids the same way
    code = ("import smoe, json; m, t = smoe.load('mistralai/Tiny-Mixtral'); "
            "print(json.dumps(smoe.generate(m, t, 'Bonjour', max_tokens=6, ignore_eos=True).token_ids))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(out.stdout) == json.loads(local.stdout)["token_ids"], out.stderr


def test_a_missing_id_offline_is_one_line_naming_it(cache):
    out = run(cache, "generate", "--model", "mistralai/Not-There", "--prompt", "x")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "mistralai/Not-There" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert lines[0].startswith("smoe: error:")
    out = run(cache, "generate", "--model", "mistralai/Tiny-Mixtral@nope", "--prompt", "x")
    assert out.returncode == 2 and "mistralai/Tiny-Mixtral@nope" in out.stderr and "Traceback" not in out.stderr


def test_pickles_in_a_snapshot_are_never_read(cache):
    out = run(cache, "generate", "--model", "someone/pickled", "--prompt", "x", "-n", "2")
    assert out.returncode == 2 and "pickle" in out.stderr and "Traceback" not in out.stderr
    # (the garbage pytorch_model.bin beside Tiny-Mixtral's safetensors was not opened: it loaded above)


def test_a_local_directory_wins_over_an_id(cache, chat_checkpoint, tmp_path):
    (tmp_path / "mistralai").mkdir()
    (tmp_path / "mistralai" / "Other").symlink_to(chat_checkpoint)  # named like an id that is in no cache
    out = run(cache, "generate", "--model", "mistralai/Other", "--prompt", "Bonjour", "-n", "3", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("text,expected", [
    ("mistralai/Mixtral-8x7B-v0.1", True), ("org/name@v1.0", True), ("org/name@refs/pr/1", True),
    ("./org/name", False), ("/abs/path", False), ("name", False), ("a/b/c", False), ("model.gguf", False),
])
def test_what_looks_like_an_id(text, expected):
    assert is_hub_id(text) == expected


def test_smoe_load_still_takes_paths(chat_checkpoint):
    model, tok = smoe.load(str(chat_checkpoint))
    assert tok is not None and model.config.vocab_size == 32000


def test_an_unknown_id_without_network_is_one_line_fast(tmp_path):
    """This machine reaches no model hub: an id (or a mistyped relative path) that is neither a
    directory nor cached fails at once with one line, not retries and a traceback."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-m", "smoe", "generate", "--model", "nosuch/model", "--prompt", "x"],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("smoe: error: nosuch/model: no local directory")
