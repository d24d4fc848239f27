"""Training data files: JSONL documents and chat examples, read with errors that name the
file and line; the held-out split of a fine-tune; the byte-level BPE trainer the demo
model's tokenizer came from. (The demo corpus itself is built by scripts/build_corpus.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from smoe.errors import SmoeError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: Mixtral's unk, BOS, EOS


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
