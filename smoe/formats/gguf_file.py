"""GGUF's container read: the header, the metadata, the tensor table and the tensors' data as
views of the file's memory map — and nothing else (what the values mean is gguf.py's).

    f = GGUFFile.open(Path("model.Q4_K_M.gguf"))
    f.fields["llama.block_count"]          # 32
    t = f.tensors[0]; t.name, t.kind, t.shape, t.data   # data: a numpy view of the map, no copy

smoe reads the container itself rather than through the `gguf` package's GGUFReader, which turns
every field into numpy objects (each of a vocabulary's 32 000 token strings one): +128 MiB of
resident memory while a file is open, ~60 MiB of it left in the heap after, and +44 MiB for
importing the package — on a file used in place that is a third of all smoe adds to the file
itself. Here a string is a Python str, an array of numbers one list, and the tensors' data are
views made when asked for. The `gguf` package stays the reference: tests/test_gguf_file.py reads
files with both and compares every field and tensor.

Layout (little-endian; GGUF versions 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64
field count; each field a string key, u32 value type, value; each tensor a string name, u32 number
of dims, u64 dims (innermost first), u32 GGML type, u64 offset into the data section, which starts
at the next multiple of `general.alignment` (32) after the table. A string is u64 length + UTF-8
bytes; an array u32 element type + u64 count + elements.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smoe.errors import CheckpointError

# ggml.h's enum ggml_type: id -> (name, values per block, bytes per block); Q8_1 / Q8_K, the formats
# activations are quantized to, are not stored in files
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
# the types whose data is an array of numbers (the rest: bytes, [.., rows, bytes per row])
PLAIN = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8,
         "I16": np.int16, "I32": np.int32, "I64": np.int64}

# metadata value types: id -> struct format (8: string, 9: array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
         7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass(frozen=True)
class Tensor:
    """One entry of the tensor table; `data` is a view of the file's map."""

    name: str
    kind: str  # the GGML type's name: "Q4_K", "F32", ...
    shape: tuple[int, ...]  # numpy order, outermost first ([rows, columns] for a matrix)
    n_elements: int
    n_bytes: int
    offset: int  # from the start of the file
    block: tuple[int, int]  # (values, bytes) per block
    map: mmap.mmap = field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        """F32 / F16 / BF16 (as uint16) / F64 / I*: the values, of `shape`; block formats: the bytes
        [.., rows, bytes per row]."""
        elems, nbytes = self.block
        if self.kind in PLAIN:
            dtype, shape = PLAIN[self.kind], self.shape
        else:
            dtype, shape = np.uint8, (*self.shape[:-1], self.shape[-1] // elems * nbytes)
        return np.frombuffer(self.map, dtype=dtype, count=self.n_bytes // np.dtype(dtype).itemsize,
                             offset=self.offset).reshape(shape)


class GGUFFile:
    """A GGUF file, its header parsed, its data memory-mapped (mode "r": read-only; "c":
    copy-on-write, so that arrays viewing it are writable in name — nothing is ever written — and
    torch takes them without a copy)."""

    def __init__(self, path: Path, fields: dict, tensors: list[Tensor], map_: mmap.mmap, size: int) -> None:
        self.path, self.fields, self.tensors, self.map, self.size = path, fields, tensors, map_, size

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> GGUFFile:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                if size == 0:
                    raise CheckpointError(f"{path}: not a readable GGUF file (it is empty)")
                map_ = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if mode == "c" else mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
        file = cls(path, {}, [], map_, size)
        try:
            file._parse()
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"{path}: not a readable GGUF file (its header is cut short or damaged: {e})"
                                  ) from None
        return file

    def _parse(self) -> None:
        path, buf = self.path, self.map
        if buf[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
        if version & 0xFFFF == 0 and version:
            raise CheckpointError(f"{path}: a big-endian GGUF file; smoe reads little-endian ones (as llama.cpp "
                                  "writes them on x86 and ARM)")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version}; smoe reads versions 2 and 3 (convert the file "
                                  "again with a current llama.cpp)")
        at = 24
        for _ in range(n_fields):
            key, at = self._string(at)
            (kind,), at = struct.unpack_from("<I", buf, at), at + 4
            self.fields[key], at = self._value(kind, at)
        table = []
        for _ in range(n_tensors):
            name, at = self._string(at)
            (n_dims,), at = struct.unpack_from("<I", buf, at), at + 4
            dims, at = struct.unpack_from(f"<{n_dims}Q", buf, at), at + 8 * n_dims
            (type_id, offset), at = struct.unpack_from("<IQ", buf, at), at + 12
            table.append((name, dims, type_id, offset))
        alignment = int(self.fields.get("general.alignment", 32))
        start = (at + alignment - 1) // alignment * alignment
        seen = set()
        for name, dims, type_id, offset in table:
            self.tensors.append(self._tensor(name, dims, type_id, start + offset, seen))

    def _tensor(self, name: str, dims: tuple[int, ...], type_id: int, offset: int, seen: set) -> Tensor:
        path = self.path
        if name in seen:
            raise CheckpointError(f"{path}: tensor {name} appears twice in the file's table: the file is damaged")
        seen.add(name)
        if type_id not in GGML_TYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has GGML type id {type_id}, which this version of smoe does not know (a "
                "newer llama.cpp format?); requantize the file to one smoe reads (e.g. Q4_K_M) with llama.cpp's "
                "llama-quantize")
        kind, elems, nbytes = GGML_TYPES[type_id]
        shape = tuple(int(d) for d in reversed(dims))
        if not dims or dims[0] % elems:
            raise CheckpointError(f"{path}: tensor {name} ({kind}, shape {list(shape)}) is not a whole number of "
                                  f"{elems}-value blocks along its rows: the file is damaged")
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        size = n // elems * nbytes
        if offset + size > self.size:
            raise CheckpointError(f"{path}: tensor {name}'s data ends at byte {offset + size} but the file has "
                                  f"{self.size} bytes: the file is truncated (an interrupted download or copy?); "
                                  "fetch it again")
        return Tensor(name, kind, shape, n, size, offset, (elems, nbytes), self.map)

    def _string(self, at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self.map, at)
        if at + 8 + n > self.size:
            raise ValueError(f"a string at byte {at} runs past the end of the file")
        return bytes(self.map[at + 8 : at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

    def _value(self, kind: int, at: int):
        if kind in SCALARS:
            fmt = "<" + SCALARS[kind]
            return struct.unpack_from(fmt, self.map, at)[0], at + struct.calcsize(fmt)
        if kind == STRING:
            return self._string(at)
        if kind == ARRAY:
            item, count = struct.unpack_from("<IQ", self.map, at)
            at += 12
            if item in NUMPY:
                dtype = np.dtype(NUMPY[item]).newbyteorder("<")
                end = at + count * dtype.itemsize
                if end > self.size:
                    raise ValueError(f"an array at byte {at} runs past the end of the file")
                return np.frombuffer(self.map, dtype=dtype, count=count, offset=at).tolist(), end
            values = []
            for _ in range(count):
                value, at = self._value(item, at)
                values.append(value)
            return values, at
        raise ValueError(f"unknown metadata value type {kind} at byte {at - 4}")
