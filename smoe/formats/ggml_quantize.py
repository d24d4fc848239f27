"""smoe's own quantizers into GGML's block formats (the layouts: smoe/ggml.py), for
`smoe quantize --type ... --out model.gguf`.

    type          how a block is fitted
    Q8_0, Q4_0,   as ggml's reference quantizers (`gguf.quants`): d from the largest-magnitude
    Q4_1, Q5_0,   value (or the range for the _1 types), one rounding each — equal to `gguf`'s
    Q5_1          quantizer bit for bit (tests/test_ggml_quantize.py)
    Q4_K, Q5_K    per 32 values a scale and a min fitted by weighted least squares over a sweep
                  of candidate step sizes (weights rms(x) + |x| over the 32: large values matter more), then
                  the 8 scales and 8 mins quantized to 6 bits against fp16 super-block d / dmin,
                  and every value rounded against the scale it will be read with
    Q2_K          the same per 16 values with 2-bit codes, 4-bit scales / mins, the fit judged
                  by weighted absolute error (weights |x|)
    Q3_K, Q6_K    symmetric: per 16 values a signed scale fitted by weighted (x²) least squares —
                  Q3_K by coordinate descent over the codes, Q6_K over a sweep of step sizes — the
                  16 scales quantized to 6 / 8 bits against the block's fp16 d
    IQ4_NL        per 32 values the scale that best fits the 16-value non-uniform table (a sweep)

This is the kind of fit llama.cpp's reference quantizers make without an importance matrix (the
technique, not its code: numpy over all blocks of a tensor at once). No calibration data: every
fit weights the values by their own magnitude. A tensor is quantized CHUNK values at a time, so
memory stays a small multiple of the chunk whatever the tensor's size.
"""

from __future__ import annotations

import numpy as np

from smoe.ggml import BLOCKS, IQ4_NL_VALUES

F32 = np.float32
CHUNK = 1 << 20  # values quantized at a time
EPS = F32(1e-15)


def _f16(v: np.ndarray) -> np.ndarray:
    """v rounded to fp16, as fp32 (what a reader of the stored fp16 gets)."""
    return v.astype(np.float16).astype(F32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """fp32 [n] -> its fp16 bytes [n, 2]."""
    return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def _signed_peak(x: np.ndarray) -> np.ndarray:
    """Per row of x [n, m]: the value of largest magnitude, its sign kept (the first such)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [n, 32] 0..15 -> 16 bytes: values 0..15 in the low nibbles, 16..31 in the high."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """Codes [n, 32] 0..31 -> 4 bytes: bit j the fifth bit of value j."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


# ------------------------------------------------------------------------------ 32-value blocks


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1) / F32(127)
    a = x * _inverse(d)[:, None]
    q = (np.sign(a) * np.floor(np.abs(a) + F32(0.5))).astype(np.int8)  # roundf: halves away from zero
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _peak_codes(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 (half 8) / Q5_0 (16): d = the signed peak / −half, codes trunc(x / d + half + ½) up to 2·half − 1."""
    d = _signed_peak(x) / F32(-half)
    q = np.minimum(np.trunc(x * _inverse(d)[:, None] + F32(half + 0.5)).astype(np.uint8), 2 * half - 1)
    return d, q


def _q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _peak_codes(x, 8)
    return np.concatenate([_f16_bytes(d), _nibbles(q)], axis=1)


def _q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _peak_codes(x, 16)
    return np.concatenate([_f16_bytes(d), _fifth_bits(q), _nibbles(q)], axis=1)


def _range_codes(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / F32(levels)
    q = np.minimum(np.trunc((x - lo[:, None]) * _inverse(d)[:, None] + F32(0.5)).astype(np.uint8), levels)
    return d, lo, q


def _q4_1(x: np.ndarray) -> np.ndarray:
    d, lo, q = _range_codes(x, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    d, lo, q = _range_codes(x, 31)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _fifth_bits(q), _nibbles(q)], axis=1)


def _nearest_of(table: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of the sorted `table` for each of v (ties to the upper entry)."""
    i = np.clip(np.searchsorted(table, v), 1, len(table) - 1)
    lower = (v - table[i - 1]) < (table[i] - v)
    return np.where(lower, i - 1, i).astype(np.uint8)


def _iq4_nl(x: np.ndarray, tries: int = 7) -> np.ndarray:
    """A scale per 32 values for the fixed table: from the peak over the table's end, then a sweep of
    2·tries + 1 step sizes, each judged by the x²-weighted least-squares scale it allows."""
    table = IQ4_NL_VALUES
    peak = _signed_peak(x)
    flat = np.abs(peak) < EPS
    peak = np.where(flat, F32(1), peak)
    w = x * x

    def fit(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = _nearest_of(table, x * inv[:, None])
        v = table[idx]
        sqx, sq2 = (w * v * x).sum(axis=1), (w * v * v).sum(axis=1)
        return idx, sqx, sq2

    idx, sqx, sq2 = fit(F32(1) / (-peak / table[0]))  # the peak lands on the table's end
    d = sqx / np.where(sq2 > 0, sq2, F32(1))
    best = d * sqx
    for t in range(-tries, tries + 1):
        cand, sqx, sq2 = fit((F32(t) + table[0]) / peak)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(better, sqx / np.where(sq2 > 0, sq2, F32(1)), d)
        best = np.where(better, d * sqx, best)
    d = np.where(flat, F32(0), d)
    idx = _nearest_of(table, x * _inverse(_f16(d))[:, None])  # against the scale as it is stored
    return np.concatenate([_f16_bytes(d), _nibbles(idx)], axis=1)


# ------------------------------------------------------------------------------ K-quant fits


def _fit_scale_min(x: np.ndarray, w: np.ndarray, top: int, rmin: float, rdelta: float, steps: int,
                   absolute: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [n, m] (weights w): scale s ≥ 0 and min m ≥ 0 so that s·q − m (q in 0..top)
    fits x. Candidates: steps + 1 step sizes (top + rmin + rdelta·i) / (max − low), the codes they
    give from the current low end, and for each the weighted least-squares scale and min of those
    codes — kept when its weighted error (squared, or absolute) is below the best so far, the low
    end moving with it (the next candidates start from the fitted min). -> (s, m) [n] and the codes
    of the fit [n, m] (0 for a constant row)."""
    hi = x.max(axis=1)
    low = np.minimum(x.min(axis=1), F32(0))
    flat = hi - low < F32(1e-10)
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)

    sum_x2 = (w * x * x).sum(axis=1, dtype=np.float64)

    def error(scale, low, q, sums=None):
        if absolute or sums is None:
            diff = scale[:, None] * q + low[:, None] - x
            return (w * (np.abs(diff) if absolute else diff * diff)).sum(axis=1)
        # Σ w (s·q + m − x)² from the fit's own sums, in float64 (no pass over the values)
        sl, sl2, sxl = (v.astype(np.float64) for v in sums)
        s, m = scale.astype(np.float64), low.astype(np.float64)
        return (s * s * sl2 + m * m * sum_w + sum_x2 + 2 * s * m * sl - 2 * s * sxl - 2 * m * sum_x).astype(F32)

    def codes(step):  # step: candidate levels per unit of range
        span = np.where(flat, F32(1), hi - low)
        return np.clip(np.rint((step / span)[:, None] * (x - low[:, None])), 0, top)

    kept = codes(F32(top))
    scale = np.where(flat, F32(1), hi - low) / F32(top)
    best = error(scale, low, kept)
    for i in range(steps + 1):
        q = codes(F32(rmin) + F32(rdelta) * F32(i) + F32(top))
        wq = w * q
        sl, sl2, sxl = wq.sum(axis=1), (wq * q).sum(axis=1), (wq * x).sum(axis=1)
        det = sum_w * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, F32(1))
        s = (sum_w * sxl - sum_x * sl) / det
        m = (sl2 * sum_x - sl * sxl) / det
        positive = m > 0  # a min above zero: fit the scale alone
        m = np.where(positive, F32(0), m)
        s = np.where(positive, sxl / np.where(sl2 > 0, sl2, F32(1)), s)
        e = error(s, m, q, (sl, sl2, sxl))
        better = ok & (e < best)
        best = np.where(better, e, best)
        scale = np.where(better, s, scale)
        low = np.where(better, m, low)
        kept = np.where(better[:, None], q, kept)
    return (np.where(flat, F32(0), np.maximum(scale, F32(0))), F32(0) - low,
            np.where(flat[:, None], F32(0), kept))


def _fit_signed(x: np.ndarray, top: int, sweep: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [n, m]: a signed scale s so that s·q (q in −top..top−1) fits x, weighted by x².
    sweep: the best of 19 step sizes around top / peak; else coordinate descent over the codes
    from that start (up to 5 passes: each code moved to its best value given the others).
    -> s [n] and the fit's codes biased by top [n, m] (0 for an all-zero row)."""
    peak = _signed_peak(x)
    flat = np.abs(peak) < EPS
    peak = np.where(flat, F32(1), peak)
    w = x * x

    def codes(inv):
        return np.clip(np.rint(inv[:, None] * x), -top, top - 1)

    q = codes(F32(-top) / peak)
    sqx, sq2 = (w * x * q).sum(axis=1), (w * q * q).sum(axis=1)
    if sweep:
        scale = sqx / np.where(sq2 > 0, sq2, F32(1))
        best = scale * sqx
        for i in range(-9, 10):
            if i == 0:
                continue
            c = codes(-(F32(top) + F32(0.1) * F32(i)) / peak)
            cx, c2 = (w * x * c).sum(axis=1), (w * c * c).sum(axis=1)
            better = (c2 > 0) & (cx * cx > best * c2)
            scale = np.where(better, cx / np.where(c2 > 0, c2, F32(1)), scale)
            best = np.where(better, scale * cx, best)
            q = np.where(better[:, None], c, q)
        return np.where(flat, F32(0), scale), np.where(flat[:, None], F32(0), q + top)
    for _ in range(5):
        changed = np.zeros(len(x), dtype=bool)
        for j in range(x.shape[1]):
            xj, wj, qj = x[:, j], w[:, j], q[:, j]
            slx = sqx - wj * xj * qj
            sl2 = sq2 - wj * qj * qj
            usable = slx > 0
            new = np.clip(np.rint(xj * sl2 / np.where(usable, slx, F32(1))), -top, top - 1)
            nlx, nl2 = slx + wj * xj * new, sl2 + wj * new * new
            take = usable & (new != qj) & (nl2 > 0) & (nlx * nlx * sq2 > sqx * sqx * nl2)
            q[:, j] = np.where(take, new, qj)
            sqx, sq2 = np.where(take, nlx, sqx), np.where(take, nl2, sq2)
            changed |= take
        if not changed.any():
            break
    return (np.where(flat | (sq2 <= 0), F32(0), sqx / np.where(sq2 > 0, sq2, F32(1))),
            np.where(flat[:, None], F32(0), q + top))


def _codes_against(x: np.ndarray, d: np.ndarray, m: np.ndarray | None, lo: int, hi: int,
                   kept: np.ndarray) -> np.ndarray:
    """The stored codes (biased by −lo) of x [n, s, m] rounded against the per-sub-block step d
    [n, s] as it will be read (and min m: x ≈ d·q − m), clipped to lo..hi; where the step is 0
    (the values read as 0 or −m whatever the code) the fit's codes `kept` stay."""
    shifted = x if m is None else x + m[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(shifted / d[..., None]), lo, hi) - lo
    return np.where(d[..., None] == 0, kept.reshape(q.shape), q).astype(np.uint8)


def _scales_mins(s: np.ndarray, m: np.ndarray, top: int) -> tuple[np.ndarray, ...]:
    """Sub-block scales and mins [n, S] (both ≥ 0) as integers 0..top against the block's fp16 d and
    dmin (the largest of each maps to top) -> (scale codes, min codes (uint8), d, dmin as read)."""
    ms, mm = s.max(axis=1), m.max(axis=1)
    ls = np.minimum(np.rint(_inverse(ms / F32(top))[:, None] * s), top).astype(np.uint8)
    lm = np.minimum(np.rint(_inverse(mm / F32(top))[:, None] * m), top).astype(np.uint8)
    return ls, lm, _f16(ms / F32(top)), _f16(mm / F32(top))


def _six_bit_pack(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] -> Q4_K/Q5_K's 12 bytes."""
    out = np.zeros((len(sc), 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out


def _k_asymmetric(x: np.ndarray, top: int, rmin: float, steps: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: x [n, 256] -> (d, dmin bytes, packed scales [n, 12], codes [n, 8, 32])."""
    n = len(x)
    sub = x.reshape(n, 8, 32)
    weight = np.sqrt((sub * sub).sum(axis=2, keepdims=True) / F32(32)) + np.abs(sub)
    s, m, kept = _fit_scale_min(sub.reshape(-1, 32), weight.reshape(-1, 32), top, rmin, 0.1, steps, False)
    ls, lm, d, dmin = _scales_mins(s.reshape(n, 8), m.reshape(n, 8), 63)
    q = _codes_against(sub, d[:, None] * ls, dmin[:, None] * lm, 0, top, kept)
    return _f16_bytes(d), _f16_bytes(dmin), _six_bit_pack(ls, lm), q


def _k_nibble_bytes(q: np.ndarray) -> np.ndarray:
    """Codes [n, 8, 32] (low 4 bits used) -> 128 bytes: per pair of sub-blocks 32 bytes, the
    first's codes in the low nibbles, the second's in the high."""
    pairs = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _k_asymmetric(x, 15, -1.0, 20)
    return np.concatenate([d, dmin, scales, _k_nibble_bytes(q)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _k_asymmetric(x, 31, -0.5, 15)
    high = ((q >> 4) & 1).astype(np.uint8)  # [n, 8, 32]: bit j of byte l is value l of sub-block j
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([d, dmin, scales, qh, _k_nibble_bytes(q)], axis=1)


def _crumb_bytes(q: np.ndarray) -> np.ndarray:
    """Codes [n, 256] (low 2 bits used) -> 64 bytes: per 128 values 32 bytes, byte l holding values
    l, l + 32, l + 64, l + 96 at bits 0, 2, 4, 6."""
    parts = (q & 3).astype(np.uint8).reshape(-1, 2, 4, 32)
    return (parts[:, :, 0] | (parts[:, :, 1] << 2) | (parts[:, :, 2] << 4) | (parts[:, :, 3] << 6)).reshape(-1, 64)


def _q2_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = x.reshape(n, 16, 16)
    s, m, kept = _fit_scale_min(sub.reshape(-1, 16), np.abs(sub).reshape(-1, 16), 3, -0.5, 0.1, 15, True)
    ls, lm, d, dmin = _scales_mins(s.reshape(n, 16), m.reshape(n, 16), 15)
    q = _codes_against(sub, d[:, None] * ls, dmin[:, None] * lm, 0, 3, kept).reshape(n, 256)
    return np.concatenate([ls | (lm << 4), _crumb_bytes(q), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _block_scales(s: np.ndarray, low: int, high: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed sub-block scales s [n, S] as integers in −low..high against one fp16 d per block (the
    largest-magnitude scale maps to −low) -> (the integers as fp32 [n, S], d [n], all-zero blocks [n])."""
    peak = _signed_peak(s)
    zero = np.abs(peak) < EPS
    inv = np.where(zero, F32(0), F32(-low) / np.where(zero, F32(1), peak))
    sc = np.clip(np.rint(inv[:, None] * s), -low, high)
    return sc, _f16(np.where(zero, F32(0), F32(1) / np.where(zero, F32(1), inv))), zero


def _q3_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = x.reshape(n, 16, 16)
    s, kept = _fit_signed(sub.reshape(-1, 16), 4, sweep=False)
    sc, d, zero = _block_scales(s.reshape(n, 16), 32, 31)
    ls = np.where(zero[:, None], 0, sc + 32).astype(np.uint8)  # stored biased by 32 (an all-zero block: zeros)
    q = _codes_against(sub, d[:, None] * sc, None, -4, 3, kept).reshape(n, 256)
    hmask = np.packbits((q.reshape(n, 8, 32) >> 2) & 1, axis=1, bitorder="little").reshape(n, 32)
    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:8] = (ls[:, 0:8] & 0x0F) | ((ls[:, 8:16] & 0x0F) << 4)
    top = (ls >> 4).reshape(n, 4, 4)  # [i, k]: scale 4i + k's top bits at bits 2i of byte 8 + k
    packed[:, 8:12] = (top << (2 * np.arange(4, dtype=np.uint8))[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([hmask, _crumb_bytes(q), packed, _f16_bytes(d)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = x.reshape(n, 16, 16)
    s, kept = _fit_signed(sub.reshape(-1, 16), 32, sweep=True)
    sc, d, _ = _block_scales(s.reshape(n, 16), 128, 127)
    ls = sc.astype(np.int8)
    q = _codes_against(sub, d[:, None] * sc, None, -32, 31, kept).reshape(n, 2, 4, 32)
    low, high = q & 0x0F, q >> 4  # per half of 128: four groups of 32
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), ls.view(np.uint8), _f16_bytes(d)], axis=1)


QUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "IQ4_NL": _iq4_nl,
              "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(values: np.ndarray, kind: str) -> np.ndarray:
    """fp32 [..., K] (K a multiple of the type's block) -> uint8 [..., K / elems · bytes]: the rows in
    block format `kind`, CHUNK values at a time."""
    elems, nbytes = BLOCKS[kind]
    if values.shape[-1] % elems:
        raise ValueError(f"{kind} rows hold whole blocks of {elems} values; {values.shape[-1]} is not a multiple")
    flat = np.asarray(values, dtype=F32).reshape(-1, elems)
    out = np.empty((len(flat), nbytes), dtype=np.uint8)
    step = max(1, CHUNK // elems)
    for start in range(0, len(flat), step):
        out[start : start + step] = QUANTIZERS[kind](np.ascontiguousarray(flat[start : start + step]))
    return out.reshape(*values.shape[:-1], values.shape[-1] // elems * nbytes)
