#!/usr/bin/env python3
"""The demo model's corpus, built offline from Debian packages and the Python interpreter.

    python scripts/build_corpus.py --out data/corpus

Domains (one label per document):

| domain | source | licence |
|---|---|---|
| en | Debian package `fortunes` (BSD fortune cookies) | BSD; texts presumed public domain |
| de | Debian package `fortunes-de` | GPL-2+ (collection) |
| it | Debian package `fortunes-it` | "freeware (public domain)" |
| es | Debian package `fortunes-es` | texts presumed public domain; GPL-2+ packaging |
| python | the running interpreter's standard library (`*.py`, tests excluded) | PSF licence |

The packages are fetched with `apt-get download` and unpacked with `dpkg -x` (nothing
beyond the package registries). A fortune file is a list of cookies separated by lines
holding a single `%`; each cookie is a document. Each Python module is a document.
Documents go to the held-out split when a hash of (domain, text) falls in the lowest 5 %,
so the split does not depend on file order or on the machine.

Output: `train.jsonl` and `heldout.jsonl` ({"domain", "source", "text"} per line),
`stats.json`, and `tokenizer.json` (byte-level BPE trained on the train split).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

from smoe.data import train_tokenizer, write_jsonl
from smoe.errors import SmoeError

PACKAGES = {"en": "fortunes", "de": "fortunes-de", "it": "fortunes-it", "es": "fortunes-es"}
FORTUNE_DIRS = {"en": "", "de": "de", "it": "it", "es": "es"}  # under /usr/share/games/fortunes/
HELDOUT_PERCENT = 5
PYTHON_BYTES = 3_000_000  # cap the (much larger) standard library near the size of the other domains


def download_packages(dest: Path, debs: Path | None = None) -> Path:
    """apt-get download + dpkg -x the fortune packages into dest; returns the unpacked root."""
    root = dest / "root"
    root.mkdir(parents=True, exist_ok=True)
    if debs is None:
        debs = dest / "debs"
        debs.mkdir(exist_ok=True)
        cmd = ["apt-get", "download", *PACKAGES.values()]
        result = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
        if result.returncode != 0:
            raise SmoeError(
                f"'{' '.join(cmd)}' failed: {result.stderr.strip().splitlines()[-1] if result.stderr else ''}; "
                "run 'apt-get update' first, or pass --debs DIR with the .deb files"
            )
    files = sorted(debs.glob("*.deb"))
    for package in PACKAGES.values():
        if not any(f.name.startswith(package + "_") for f in files):
            raise SmoeError(f"{debs}: no .deb file for package '{package}'")
    for f in files:
        subprocess.run(["dpkg", "-x", str(f), str(root)], check=True)
    return root


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def fortune_documents(root: Path, domain: str) -> list[dict]:
    folder = root / "usr/share/games/fortunes" / FORTUNE_DIRS[domain]
    docs = []
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        for i, cookie in enumerate(_read_text(path).split("\n%\n")):
            text = cookie.strip("\n%").rstrip()
            if text.strip():
                docs.append({"domain": domain, "source": f"{PACKAGES[domain]}:{path.name}#{i}", "text": text})
    return docs


def python_documents(limit_bytes: int = PYTHON_BYTES) -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}
    paths = [p for p in sorted(stdlib.rglob("*.py")) if not skip & set(p.relative_to(stdlib).parts)]
    random.Random(0).shuffle(paths)  # a fixed sample of modules, not the first ones alphabetically
    docs, total = [], 0
    for path in paths:
        text = _read_text(path)
        if not text.strip() or len(text) > 200_000:
            continue
        docs.append({"domain": "python", "source": f"stdlib:{path.relative_to(stdlib)}", "text": text})
        total += len(text.encode())
        if total >= limit_bytes:
            break
    return docs


def is_heldout(doc: dict) -> bool:
    digest = hashlib.sha256(f"{doc['domain']}\0{doc['text']}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def build(out: Path, *, debs: Path | None = None, vocab_size: int = 8192) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = download_packages(Path(tmp), debs)
        docs = [d for domain in PACKAGES for d in fortune_documents(root, domain)]
    docs += python_documents()
    train = [d for d in docs if not is_heldout(d)]
    heldout = [d for d in docs if is_heldout(d)]
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    train_tokenizer((d["text"] for d in train), vocab_size, out / "tokenizer.json")
    stats = {
        "documents": {"train": Counter(d["domain"] for d in train), "heldout": Counter(d["domain"] for d in heldout)},
        "bytes": {"train": _bytes(train), "heldout": _bytes(heldout)},
        "vocab_size": vocab_size,
        "python": shutil.which("python3") and sysconfig.get_python_version(),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _bytes(docs: list[dict]) -> dict[str, int]:
    total: Counter = Counter()
    for d in docs:
        total[d["domain"]] += len(d["text"].encode())
    return dict(total)


def main() -> int:
    p = argparse.ArgumentParser(description="Build the demo model's corpus offline.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory, e.g. data/corpus")
    p.add_argument("--debs", type=Path, default=None, metavar="DIR",
                   help="use these .deb files instead of apt-get download")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    args = p.parse_args()
    try:
        stats = build(args.out, debs=args.debs, vocab_size=args.vocab_size)
    except SmoeError as e:
        print(f"build_corpus: error: {e}", file=sys.stderr)
        return 2
    for split in ("train", "heldout"):
        parts = ", ".join(f"{d} {n} docs / {stats['bytes'][split][d] / 1e6:.2f} MB"
                          for d, n in stats["documents"][split].items())
        print(f"{split}: {parts}")
    print(f"wrote {args.out}/train.jsonl, heldout.jsonl, tokenizer.json (vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
