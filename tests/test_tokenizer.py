"""Mixtral-8x7B's real tokenizer (mistral-common's tokenizer.model.v1) through all three backends."""

from __future__ import annotations

import pytest

from conftest import v1_tokenizer_path
from smoe.errors import TokenizerError
from smoe.tokenizer import (
    HFTokenizer,
    IncrementalDetokenizer,
    MistralCommonTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

TEXTS = [
    "", " ", "\n", "Hello world", " leading space", "  two leading spaces", "trailing ", "trailing  ",
    "The quick brown fox jumps over the lazy dog.",
    "Ça coûte 5€ — très cher! Où est l'hôtel? Le cœur a ses raisons.",
    "Grüße aus München: Straße, Übermut, Äpfel und Öl.",
    "¿Dónde está la biblioteca? Mañana, señor.",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤖🎉👍🏽 and flags 🇫🇷",
    "def f(x):\n    return x  # comment\n\tif x:\n\t\tpass\n",
    "many   spaces\n\n\nnewlines   \r\n  ",
    "        eight spaces", "a  b   c    d     e",
    "<s> </s> [INST] [/INST] <unk>",
    "x" * 100,
    "Ünïcödé: ñ ø å ß ł đ ž ş ğ ı",
    "math: ∑ᵢ xᵢ² ≤ ∞, 3.14159, 1e-10, 0x1F",
]


@pytest.fixture(scope="module")
def backends(v1_tokenizer_json):
    path = v1_tokenizer_path()
    return {
        "hf": HFTokenizer(v1_tokenizer_json),
        "sentencepiece": SentencePieceTokenizer(path),
        "mistral-common": MistralCommonTokenizer(path),
    }


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_on_all_backends(backends, text):
    ids = {name: tok.encode(text) for name, tok in backends.items()}
    assert ids["hf"] == ids["sentencepiece"] == ids["mistral-common"]
    assert ids["hf"][0] == 1  # BOS
    decoded = {name: tok.decode(ids[name]) for name, tok in backends.items()}
    assert decoded["hf"] == decoded["sentencepiece"] == decoded["mistral-common"] == text


def test_special_ids_and_vocab(backends):
    for tok in backends.values():
        assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
        assert tok.encode("hi", bos=False)[0] != 1


def test_known_ids(backends):
    # ids of the v1 vocabulary, as published with Mixtral-8x7B
    assert backends["sentencepiece"].encode("Hello world") == [1, 22557, 1526]


def test_load_tokenizer_picks_backend(tmp_path, v1_tokenizer_json):
    import shutil

    assert load_tokenizer(tmp_path) is None
    shutil.copy(v1_tokenizer_path(), tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tmp_path, backend="mistral-common"), MistralCommonTokenizer)
    shutil.copy(v1_tokenizer_json, tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    assert isinstance(load_tokenizer(tmp_path, backend="sentencepiece"), SentencePieceTokenizer)
    with pytest.raises(TokenizerError, match="unknown tokenizer backend"):
        load_tokenizer(tmp_path, backend="tiktoken")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot read tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["hf", "sentencepiece", "mistral-common"])
@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip()])
def test_incremental_detokenizer_never_breaks_utf8(backends, name, text):
    tok = backends[name]
    ids = tok.encode(text, bos=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_detokenizer_holds_back_partial_characters(backends):
    tok = backends["sentencepiece"]
    ids = tok.encode("🤖", bos=False)  # byte-fallback: one character over several ids
    assert len(ids) >= 4
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1].endswith("🤖")


CHATS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"}],
    "multi turn": [
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant."},
        {"role": "user", "content": "Tell me a joke about Straße and 日本."},
    ],
    "system": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "How are you?"},
    ],
    "two systems, long": [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use lists."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c  with  spaces\n"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ],
}


@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("name", ["hf", "sentencepiece"])
def test_chat_template_matches_mistral_common(backends, chat, name):
    expected = backends["mistral-common"].apply_chat_template(CHATS[chat])
    assert backends[name].apply_chat_template(CHATS[chat]) == expected
    assert expected[0] == 1 and "[INST]" in backends["sentencepiece"].decode(expected)


def test_chat_template_rejects_bad_messages(backends):
    tok = backends["sentencepiece"]
    with pytest.raises(TokenizerError, match="at least one message"):
        tok.apply_chat_template([])
    with pytest.raises(TokenizerError, match="must start with a user message"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(TokenizerError, match="message 0: role"):
        tok.apply_chat_template([{"role": "robot", "content": "hi"}])


@pytest.mark.parametrize("name", ["hf", "sentencepiece", "mistral-common"])
def test_detokenizer_with_prompt_context_keeps_the_space(backends, name):
    tok = backends[name]
    prompt, continuation = tok.encode("The meaning of life is"), tok.encode("to eat 🍕 daily", bos=False)
    detok = IncrementalDetokenizer(tok, context=prompt)
    pieces = [detok.add(i) for i in continuation] + [detok.flush()]
    assert "".join(pieces) == " to eat 🍕 daily"
