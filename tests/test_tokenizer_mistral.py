"""Mistral's newer tokenizers (v3 and v7 SentencePiece, tekken), whose [INST] and tool tokens are
control tokens: smoe reads them through mistral-common, and a chat renders exactly as
mistral-common's own encoding of the same conversation (system prompt, several turns)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from smoe.tokenizer import MistralCommonTokenizer, load_tokenizer  # noqa: E402

DATA = Path(mistral_common.__file__).parent / "data"
FILES = {  # file shipped by mistral-common -> the name it has in a model repository
    "mistral_instruct_tokenizer_240323.model.v3": "tokenizer.model",  # e.g. Mixtral-8x22B-Instruct-v0.1
    "mistral_instruct_tokenizer_241114.model.v7": "tokenizer.model.v7",
    "tekken_240718.json": "tekken.json",
    "tekken_240911.json": "tekken.json",
}
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And a fruit?"},
     {"role": "assistant", "content": "A pear."}, {"role": "user", "content": "Thanks! Ünïcödé 日本"}],
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


def mistral_common_ids(file: Path, messages) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return MistralTokenizer.from_file(str(file)).encode_chat_completion(request).tokens


@pytest.mark.parametrize("source", list(FILES))
def test_chat_encodings_equal_mistral_commons(source, tmp_path):
    shutil.copy(DATA / source, tmp_path / FILES[source])
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, MistralCommonTokenizer)
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == mistral_common_ids(DATA / source, messages)
    # control tokens are not text: typing "[INST]" in a prompt does not make the control token
    inst = tok.apply_chat_template([{"role": "user", "content": "x"}])
    typed = tok.encode("[INST]", bos=False)
    assert not set(typed) & (set(inst) - set(tok.encode("x", bos=False)) - {tok.bos_id})


def test_a_hub_directory_with_tokenizer_json_and_a_v3_model_chats_through_mistral_common(tmp_path, v1_tokenizer_json):
    """Hub repositories ship tokenizer.json beside tokenizer.model: the v3 file decides the chat format."""
    shutil.copy(v1_tokenizer_json, tmp_path / "tokenizer.json")
    shutil.copy(DATA / "mistral_instruct_tokenizer_240323.model.v3", tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template(CONVERSATIONS[0]) == mistral_common_ids(
        DATA / "mistral_instruct_tokenizer_240323.model.v3", CONVERSATIONS[0])


def test_v1_stays_as_it_was(tmp_path):
    shutil.copy(DATA / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert not isinstance(tok, MistralCommonTokenizer)
    assert tok.apply_chat_template(CONVERSATIONS[0]) == mistral_common_ids(DATA / "tokenizer.model.v1", CONVERSATIONS[0])


def test_a_conversation_mistral_common_refuses_is_a_tokenizer_error(tmp_path):
    from smoe.errors import TokenizerError

    shutil.copy(DATA / "tekken_240911.json", tmp_path / "tekken.json")
    tok = load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError):
        tok.apply_chat_template([{"role": "assistant", "content": "first"}])
