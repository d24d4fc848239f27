"""One Tokenizer interface over three backends, a chat template, a streaming detokenizer.

Backends:
- ``HFTokenizer``: Hugging Face ``tokenizers`` reading ``tokenizer.json``;
- ``SentencePieceTokenizer``: ``sentencepiece`` reading ``tokenizer.model`` (Mistral's v1-v3);
- ``MistralCommonTokenizer``: Mistral's own ``mistral-common`` package (optional dependency).

For Mixtral-8x7B's tokenizer (``tokenizer.model.v1``) all three give the same ids
(tests/test_tokenizer.py checks it on a varied text set).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from smoe.errors import TokenizerError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str, *, bos: bool = True) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...  # without BOS

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[Message]) -> list[int]: ...


class _TemplateMixin:
    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        return mistral_instruct_ids(self, messages)


class HFTokenizer(_TemplateMixin):
    def __init__(self, path: str | Path, bos_token: str | None = None, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        try:
            self.tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            raise TokenizerError(f"{path}: cannot read tokenizer ({e})") from None
        # user text is text: "<s>" typed in a prompt must not become the BOS token
        self.tok.encode_special_tokens = True
        self.path = path
        config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        bos_token = bos_token or _token_str(config.get("bos_token")) or "<s>"
        eos_token = eos_token or _token_str(config.get("eos_token")) or "</s>"
        self.bos_id = self.tok.token_to_id(bos_token)
        self.eos_id = self.tok.token_to_id(eos_token)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (tokenizers encodes them in parallel), without BOS."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)


class SentencePieceTokenizer(_TemplateMixin):
    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: cannot read SentencePiece model ({e})") from None
        self.path = path
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t, bos=False) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(i)


class MistralCommonTokenizer:
    def __init__(self, path: str | Path) -> None:
        try:
            from mistral_common.protocol.instruct.validator import ValidationMode
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        except ImportError:
            raise TokenizerError(
                "the mistral-common backend needs the package: pip install 'smoe[mistral]'"
            ) from None
        path = Path(path)
        try:
            self.mistral = MistralTokenizer.from_file(str(path))
            self.mistral_finetuning = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
        except Exception as e:  # mistral-common raises several types for bad files
            raise TokenizerError(f"{path}: cannot read tokenizer with mistral-common ({e})") from None
        self.path = path
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.bos_id = self.raw.bos_id
        self.eos_id = self.raw.eos_id
        self.vocab_size = self.raw.n_words

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        return self.raw.encode(text, bos=bos, eos=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t, bos=False) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.raw.decode(list(ids))

    def apply_chat_template(self, messages: list[Message], *, finetuning: bool = False) -> list[int]:
        """The prompt for a reply; finetuning=True renders a conversation that ends with an
        assistant answer (and its </s>), as mistral-common's finetuning mode validates it."""
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        _check_messages(messages)
        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        try:
            request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
            encoder = self.mistral_finetuning if finetuning else self.mistral
            return encoder.encode_chat_completion(request).tokens
        except Exception as e:  # mistral-common's validation raises its own types
            raise TokenizerError(f"mistral-common cannot render this conversation: {e}") from None


def mistral_instruct_ids(tokenizer: Tokenizer, messages: list[Message]) -> list[int]:
    """The Mistral instruct format (v1, as Mixtral-8x7B-Instruct was trained):

        <s>[INST] {system}\\n\\n{user 1} [/INST] {assistant 1}</s>[INST] {user 2} [/INST]

    Each piece is tokenized on its own (so each gets SentencePiece's leading-space
    prefix), system messages are merged into the first user turn, consecutive
    messages of the same role are joined by a blank line.
    """
    return [i for ids, _ in mistral_instruct_segments(tokenizer, messages) for i in ids]


def mistral_instruct_segments(tokenizer: Tokenizer, messages: list[Message]) -> list[tuple[list[int], bool]]:
    """mistral_instruct_ids as (ids, is_assistant) pieces: an assistant piece is its answer and </s>."""
    _check_messages(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    turns: list[Message] = []
    for m in messages:
        if m["role"] == "system":
            continue
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1] = {"role": m["role"], "content": turns[-1]["content"] + "\n\n" + m["content"]}
        else:
            turns.append(dict(m))
    segments = [([tokenizer.bos_id], False)] if tokenizer.bos_id is not None else []
    first_user = True
    for m in turns:
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if first_user and system else m["content"]
            first_user = False
            segments.append((tokenizer.encode(f"[INST] {content} [/INST]", bos=False), False))
        else:
            eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
            segments.append((tokenizer.encode(m["content"], bos=False) + eos, True))
    return segments


def chat_training_ids(tokenizer: Tokenizer, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """A conversation rendered with the model's chat template -> (ids, trained): trained[i]
    is True for the tokens of assistant answers (and their </s>), the only ones a chat
    fine-tune learns to predict. Messages after the last answer teach nothing and are dropped."""
    last_answer = max((n for n, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last_answer is None:
        raise TokenizerError("no assistant message: nothing to learn from this conversation")
    messages = messages[: last_answer + 1]
    if not isinstance(tokenizer, MistralCommonTokenizer):
        segments = mistral_instruct_segments(tokenizer, messages)
        return [i for ids, _ in segments for i in ids], [t for ids, t in segments for _ in ids]
    # mistral-common renders whole requests; an answer is what its message adds to the prefix before it
    ids = tokenizer.apply_chat_template(messages, finetuning=True)
    trained = [False] * len(ids)
    for n, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:n])
        through = tokenizer.apply_chat_template(messages[: n + 1], finetuning=True)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise TokenizerError(f"message {n}: the chat template does not render this conversation "
                                 "as a sequence of prefixes; merge consecutive assistant messages")
        trained[len(before) : len(through)] = [True] * (len(through) - len(before))
    return ids, trained


def _check_messages(messages: list[Message]) -> None:
    if not messages:
        raise TokenizerError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise TokenizerError(f"message {i}: role must be 'system', 'user' or 'assistant'")
        if not isinstance(m.get("content"), str):
            raise TokenizerError(f"message {i}: content must be a string")
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user":
        raise TokenizerError("a chat must start with a user message (after any system messages)")


def _read_tokenizer_config(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} as older transformers write it
        return value.get("content")
    return value if isinstance(value, str) else None


SENTENCEPIECE_NAMES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v2", "tokenizer.model.v3",
                       "tokenizer.model.v7")


def load_tokenizer(path: str | Path, backend: str | None = None) -> Tokenizer | None:
    """The tokenizer in a checkpoint directory (or a tokenizer file), or None if there is none.

    backend: None picks mistral-common for Mistral's instruct vocabularies (tekken.json, or a
    tokenizer.model* with [INST] as a control token: v2, v3, v7), else tokenizer.json, then
    tokenizer.model*; 'hf', 'sentencepiece' or 'mistral-common' forces one.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = [path / n for n in ("tokenizer.json", *SENTENCEPIECE_NAMES, "tekken.json") if (path / n).exists()]
    if backend not in (None, "hf", "sentencepiece", "mistral-common"):
        raise TokenizerError(f"unknown tokenizer backend {backend!r}; use hf, sentencepiece or mistral-common")
    instruct = next((f for f in files if _mistral_instruct_file(f)), None)
    if backend is None and instruct is not None:
        # v2+ instruct vocabularies ([INST] a control token) and tekken: their chat format is
        # mistral-common's (control tokens, system prompt placement), so it reads them whole
        return _versioned_mistral_common(instruct)
    for file in files:
        is_json = file.suffix == ".json"
        if backend == "mistral-common" or (backend is None and file.name == "tekken.json"):
            return MistralCommonTokenizer(file)
        if backend in (None, "hf") and is_json:
            return HFTokenizer(file)
        if backend in (None, "sentencepiece") and not is_json:
            return SentencePieceTokenizer(file)
    if backend is not None and files:
        raise TokenizerError(f"{path}: no tokenizer file for backend {backend!r}")
    return None


def _versioned_mistral_common(path: Path) -> MistralCommonTokenizer:
    """mistral-common takes a SentencePiece file's version from its name and reads an
    unversioned `tokenizer.model` as v1; one with [INST] as a control token (as Hugging Face
    repositories of v3 models ship it: Mixtral-8x22B-Instruct) is v3, the format of that
    vocabulary. It is read through a versioned name (the file is loaded at once)."""
    if path.name != "tokenizer.model":
        return MistralCommonTokenizer(path)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "tokenizer.model.v3"
        link.symlink_to(path.resolve())
        tok = MistralCommonTokenizer(link)
    tok.path = path
    return tok


def _mistral_instruct_file(path: Path) -> bool:
    """tekken.json, or a SentencePiece model whose vocabulary has [INST] as a control token
    (Mistral's v2, v3, v7 tokenizers; v1 wrote [INST] as plain text)."""
    if path.name == "tekken.json":
        return True
    if path.suffix == ".json":
        return False
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError):
        return False  # SentencePieceTokenizer reports the broken file
    i = sp.PieceToId("[INST]")
    return i != sp.unk_id() and sp.IsControl(i)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, never emitting broken UTF-8.

    Decoding token by token is wrong twice over: SentencePiece drops the leading space
    of a sequence's first piece, and byte-fallback tokens split a character over several
    ids. So each step decodes a short window twice — the tokens already shown, and the
    same plus the new ones — and emits only the difference; while the difference ends
    in U+FFFD (an incomplete character) it waits for more tokens.
    Concatenating the pieces gives decode(all ids).

    `context`: the ids before the stream (the prompt's last few are enough), so that the
    first piece keeps the space that separates it from the prompt; the pieces then add up
    to decode(context + ids)[len(decode(context)):].
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()) -> None:
        self.tokenizer = tokenizer
        context = list(context)[-4:]
        while context and "\ufffd" in tokenizer.decode(context):  # do not start mid-character
            context = context[1:]
        self.ids: list[int] = context
        self.prefix_offset = 0  # window start
        self.read_offset = len(context)  # tokens before this are already emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        shown = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if (full.endswith("\ufffd") and not final) or len(full) < len(shown):
            return ""
        piece = full[len(shown) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return piece
