"""smoe's GGUF container reader (smoe/formats/gguf_file.py) against the `gguf` package's GGUFReader:
the same fields, the same tensors and bytes; damaged headers one line naming the file; and a file
used in place loads without importing `gguf` (or torch._dynamo: building on meta must not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from smoe.errors import CheckpointError
from smoe.formats.gguf_file import GGML_TYPES, GGUFFile

sys.path.insert(0, str(Path(__file__).parent))
from test_formats_gguf import write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def original(checkpoint_factory):
    return checkpoint_factory(seed=5, vocab_size=32000, hidden_size=256, intermediate_size=512,
                              num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)


def _same_as_ggufs_reader(path: Path) -> GGUFFile:
    ours, theirs = GGUFFile.open(path), gguf.GGUFReader(str(path))
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}  # (its header, as fields)
    assert list(ours.fields) == list(fields)
    for key, field in fields.items():
        want, got = field.contents(), ours.fields[key]
        assert type(got) is type(want) and got == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.kind == ref.tensor_type.name and mine.shape == tuple(reversed(ref.shape.tolist()))
        assert mine.n_elements == int(ref.n_elements) and mine.n_bytes == int(ref.n_bytes)
        assert mine.offset == ref.data_offset and mine.data.shape == ref.data.shape
        assert np.array_equal(mine.data.view(np.uint8), np.asarray(ref.data).view(np.uint8)), mine.name
    return ours


def test_the_type_table_is_ggmls():
    for type_id, (name, elems, nbytes) in GGML_TYPES.items():
        assert GGMLQuantizationType(type_id).name == name
        assert GGML_QUANT_SIZES[GGMLQuantizationType(type_id)] == (elems, nbytes)


@pytest.mark.parametrize("qtype,experts_qtype", [("Q8_0", "Q4_K"), ("F16", None)])
def test_a_model_file_reads_as_ggufs_reader_reads_it(original, tmp_path, qtype, experts_qtype):
    """Every field (strings, the token list, float and int arrays) and every tensor (F32 / F16 values,
    block formats as bytes [rows, row bytes]) as GGUFReader gives them."""
    file = write_gguf(original, tmp_path / "m.gguf", qtype, experts_qtype)
    ours = _same_as_ggufs_reader(file)
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 32000
    assert ours.fields["general.architecture"] == "llama"


def test_byte_level_merges_and_odd_alignment_read_as_ggufs_reader_reads_them(tmp_path):
    """A byte-level BPE's merges (a list of strings), every scalar type, an array of bools, a
    non-default general.alignment and tensors of several plain types."""
    path = tmp_path / "fields.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    writer.add_token_merges(["a b", "ab c", "é ü"])
    scalars = {"uint8": 7, "int8": -7, "uint16": 700, "int16": -700, "uint32": 70000, "int32": -70000,
               "float32": 0.5, "bool": True, "uint64": 2**40, "int64": -(2**40), "float64": 0.25}
    for kind, value in scalars.items():
        getattr(writer, f"add_{kind}")(f"test.{kind}", value)
    writer.add_array("test.flags", [True, False, True])
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b", np.arange(6, dtype=np.float16).reshape(2, 3))
    writer.add_tensor("c", np.arange(5, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = _same_as_ggufs_reader(path)
    assert ours.fields["tokenizer.ggml.merges"][2] == "é ü" and ours.fields["test.uint64"] == 2**40
    assert ours.tensors[0].data.tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()


def test_damaged_headers_are_one_line_naming_the_file(original, tmp_path):
    file = write_gguf(original, tmp_path / "m.gguf", "Q8_0")
    data = file.read_bytes()
    cases = {"empty": (b"", "empty"), "magic": (b"GGML" + data[4:], "does not start with 'GGUF'"),
             "version": (data[:4] + (1).to_bytes(4, "little") + data[8:], "version 1"),
             "big-endian": (data[:4] + (3).to_bytes(4, "big") + data[8:], "big-endian"),
             "cut": (data[:5000], "cut short or damaged")}  # inside the token list
    for name, (raw, what) in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(raw)
        with pytest.raises(CheckpointError) as err:
            GGUFFile.open(bad)
        message = str(err.value)
        assert str(bad) in message and what in message and "\n" not in message, message
    with pytest.raises(CheckpointError, match="cannot be read"):
        GGUFFile.open(tmp_path / "absent.gguf")


def test_a_file_in_place_loads_without_ggufs_reader_or_dynamo(original, tmp_path):
    """The run-time path reads the container itself: neither the `gguf` package (+44 MiB imported,
    +128 MiB while its reader holds Mixtral's vocabulary) nor torch._dynamo / sympy (which torch's
    meta versions of normal_ and arange import: +70 MiB) is imported by loading a file in place and
    generating; the embedding stays a view of the file."""
    file = write_gguf(original, tmp_path / "m.gguf", "Q8_0", "Q4_K")
    code = ("import sys, json, smoe\n"
            f"model, tok = smoe.load({str(file)!r}, gguf_in_place=True)\n"
            "out = smoe.generate(model, tok, 'Hello', max_tokens=4)\n"
            "print(json.dumps({m: m in sys.modules for m in ('gguf', 'torch._dynamo', 'sympy')}\n"
            "                 | {'embed': type(model.embed_tokens).__name__}))\n")
    env = {**os.environ, "SMOE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"gguf": False, "torch._dynamo": False, "sympy": False, "embed": "GGMLEmbedding"}
