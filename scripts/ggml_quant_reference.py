"""llama.cpp's quantizers on a fixed set of rows: the reference tests/test_ggml_quantize.py holds
smoe's GGUF quantizers (smoe/formats/ggml_quantize.py) to.

    pip install -e '.[bench]'        # llama-cpp-python 0.3.36 (its libggml-base)
    python scripts/ggml_quant_reference.py

Writes tests/data/ggml_quants/llama_cpp.npz: `rows` (fp16 values, read as fp32) and, per GGML
type, the blocks llama.cpp's `ggml_quantize_chunk` makes of them without an importance matrix
(what `llama-quantize` does without --imatrix).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smoe.ggml import BLOCKS, TYPE_IDS  # noqa: E402


def rows() -> np.ndarray:
    """16 rows of 512 values: Gaussian at three scales, heavy tails, outliers, one-signed and constant
    blocks, zeros, values in fp16's subnormal range."""
    rng = np.random.default_rng(29)
    x = rng.standard_normal((16, 512)) * 0.02
    x[1] *= 50
    x[2] *= 0.05
    x[3] = rng.standard_t(3, 512) * 0.02
    x[4, rng.integers(0, 512, 6)] *= 40  # a few outliers
    x[5, :256] = np.abs(x[5, :256])
    x[5, 256:] = -np.abs(x[5, 256:])
    x[6, :256] = 0.0
    x[6, 256:] = 0.03
    x[7] = rng.standard_normal(512) * 1e-6
    x[8, :32] = 0.0
    x[9] = np.round(x[9] / 0.004) * 0.004  # on a grid
    x[10, ::2] = 0.0
    return x.astype(np.float16)


def main() -> int:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    x = np.ascontiguousarray(rows().astype(np.float32))
    out = {"rows": rows()}
    for kind, type_id in TYPE_IDS.items():
        elems, nbytes = BLOCKS[kind]
        blocks = np.zeros((x.shape[0], x.shape[1] // elems * nbytes), dtype=np.uint8)
        lib.ggml_quantize_chunk(type_id, x.ctypes.data_as(ctypes.c_void_p), blocks.ctypes.data_as(ctypes.c_void_p),
                                ctypes.c_int64(0), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]), None)
        out[kind] = blocks
    path = ROOT / "tests" / "data" / "ggml_quants" / "llama_cpp.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes): {', '.join(TYPE_IDS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
