"""The demo model's corpus, built offline from Debian packages and the Python interpreter.

    smoe data build --out data/corpus

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

import hashlib
import json
import random
import shutil
import subprocess
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

from smoe.errors import SmoeError

PACKAGES = {"en": "fortunes", "de": "fortunes-de", "it": "fortunes-it", "es": "fortunes-es"}
FORTUNE_DIRS = {"en": "", "de": "de", "it": "it", "es": "es"}  # under /usr/share/games/fortunes/
HELDOUT_PERCENT = 5
PYTHON_BYTES = 3_000_000  # cap the (much larger) standard library near the size of the other domains
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: Mixtral's unk, BOS, EOS


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


def train_tokenizer(texts, vocab_size: int, out: Path) -> None:
    """Byte-level BPE (every byte sequence encodes; no unknown tokens) with <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out))


def write_jsonl(path: Path, docs: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    """Documents with a 'text' string, one JSON object per line (blank lines skipped)."""
    return read_examples(path, chat=False)


def read_examples(path: Path, chat: bool = False) -> list[dict]:
    """Training examples from a file, each error naming the file and line.

    Plain text (chat=False): JSONL with a 'text' string per line, or any other file read
    as one text document. Chat (chat=True): JSONL with a 'messages' list per line, each
    message {"role": "system" | "user" | "assistant", "content": str}, at least one of
    them from the assistant (the tokens the model learns to produce).
    """
    path = Path(path)
    if not path.exists():
        raise SmoeError(f"{path}: no such file")
    if path.is_dir():
        raise SmoeError(f"{path}: is a directory; give a .jsonl or text file")
    if not chat and path.suffix != ".jsonl":
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise SmoeError(f"{path}: the file is empty; nothing to train on")
        return [{"text": text}]
    examples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise SmoeError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(doc, dict):
                raise SmoeError(f"{path}:{n}: expected a JSON object, found {type(doc).__name__}")
            problem = _chat_problem(doc) if chat else _text_problem(doc)
            if problem:
                raise SmoeError(f"{path}:{n}: {problem}")
            examples.append(doc)
    if not examples:
        raise SmoeError(f"{path}: the file is empty; nothing to train on")
    return examples


def _text_problem(doc: dict) -> str | None:
    if "text" not in doc:
        hint = " (this looks like chat data: add --chat)" if "messages" in doc else ""
        return f"missing field 'text'{hint}"
    if not isinstance(doc["text"], str):
        return "field 'text' must be a string"
    return None


def _chat_problem(doc: dict) -> str | None:
    messages = doc.get("messages")
    if messages is None:
        hint = " (this looks like plain-text data: drop --chat)" if "text" in doc else ""
        return f"missing field 'messages'{hint}"
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return f"message {i}: 'role' must be 'system', 'user' or 'assistant'"
        if not isinstance(m.get("content"), str):
            return f"message {i}: 'content' must be a string"
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user":
        return "a conversation must start with a user message (after any system messages)"
    if "assistant" not in roles:
        return "no assistant message: nothing to learn from this conversation"
    return None


def split_heldout(examples: list[dict], every: int = 20) -> tuple[list[dict], list[dict]]:
    """(train, heldout): every 20th example held out when there are at least 20; a single
    text document is split at the line boundary nearest 95 % of its length."""
    if len(examples) >= every:
        return ([e for i, e in enumerate(examples) if i % every != every - 1],
                [e for i, e in enumerate(examples) if i % every == every - 1])
    if len(examples) == 1 and "text" in examples[0]:
        text = examples[0]["text"]
        cut = text.rfind("\n", 0, int(len(text) * 0.95)) + 1
        if 0 < cut < len(text):
            return [{**examples[0], "text": text[:cut]}], [{**examples[0], "text": text[cut:]}]
    return examples, []


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
