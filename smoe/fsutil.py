"""Operating-system helpers for weights in memory-mapped files: read-ahead and release
advice (madvise), glibc's mmap threshold, and atomic file writes. Shared by checkpoint
loading, quantization, packing and offloading, which no longer import each other for them."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

MADV_WILLNEED, MADV_DONTNEED, MADV_HUGEPAGE = 3, 4, 14  # Linux <sys/mman.h>
HUGE_PAGE = 2 << 20
M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def _advise(t: torch.Tensor, advice: int, whole_pages: bool) -> None:
    if sys.platform != "linux" or t.device.type != "cpu" or not t.is_contiguous():
        return
    if t.untyped_storage().resizable():  # memory torch allocated, not a view of the map
        return
    page = mmap.PAGESIZE
    begin, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    if whole_pages:  # only pages entirely inside the tensor
        start, end = -(-begin // page) * page, end // page * page
    else:  # every page the tensor touches
        start, end = begin // page * page, -(-end // page) * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


def read_ahead(t: torch.Tensor) -> None:
    """Ask the kernel to start reading a memory-mapped tensor's pages from the file now, in
    large requests, instead of page by page as the copy touches them (~20 % faster cold reads)."""
    _advise(t, MADV_WILLNEED, whole_pages=False)


def release_pages(t: torch.Tensor) -> None:
    """Give back the resident pages of a tensor that views a checkpoint's memory map, once its
    contents live elsewhere (packed, quantized, copied): they are clean private file pages,
    so dropping them loses nothing — touching the tensor again reads them from the file. This
    keeps a load's peak memory at the new copy instead of the new copy plus the file."""
    _advise(t, MADV_DONTNEED, whole_pages=True)


def release_module_pages(modules) -> None:
    """release_pages for every parameter and buffer of these modules (linears whose contents
    now live in a stacked, repacked or quantized copy); memory torch allocated is left alone."""
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            release_pages(t)


def huge_page_empty(nbytes: int) -> torch.Tensor:
    """`nbytes` of uninitialised CPU memory (uint8), starting on a 2 MiB boundary and backed by
    transparent huge pages where the system has them (Linux, THP not "never"): advised with
    madvise before the first touch. torch.empty may return heap memory glibc has touched before,
    already on 4 KiB pages the advice does not change, so those pages are dropped first
    (MADV_DONTNEED: the memory is ours and its contents undefined) and the first write faults
    in huge pages. Under 1 MiB, or elsewhere: plain memory."""
    if sys.platform != "linux" or nbytes < HUGE_PAGE // 2:
        return torch.empty(nbytes, dtype=torch.uint8)
    whole = -(-nbytes // HUGE_PAGE) * HUGE_PAGE  # the last huge page whole, so no part of it is shared
    raw = torch.empty(whole + HUGE_PAGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    region = raw[offset : offset + nbytes]
    start, length = ctypes.c_void_p(region.data_ptr()), ctypes.c_size_t(whole)
    _libc().madvise(start, length, MADV_HUGEPAGE)
    _libc().madvise(start, length, MADV_DONTNEED)
    return region


def huge_page_copy(t: torch.Tensor, min_bytes: int = 2 * HUGE_PAGE) -> torch.Tensor:
    """A contiguous copy of a large CPU tensor in huge pages (huge_page_empty). Streaming reads
    keep going across a huge page where the hardware prefetchers stop at every 4 KiB page and
    the TLB misses every 4 KiB: the native kernels read weights 12-18 % faster from them
    (docs/KERNELS.md). Small tensors, other devices: a plain contiguous copy (a copy always:
    the source may view a checkpoint's memory map, which the copy must not keep alive)."""
    if sys.platform != "linux" or t.device.type != "cpu" or t.numel() * t.element_size() < min_bytes:
        return t.clone(memory_format=torch.contiguous_format)
    return huge_page_gather([t])[0]


def huge_page_gather(tensors: list[torch.Tensor], align: int = 64) -> list[torch.Tensor]:
    """Copies of CPU tensors laid one after another (each on an `align`-byte boundary) in one
    huge-page region: small tensors read together (a layer's attention weights, scales, norms)
    get huge pages too, and adjacent memory. The copies are views of that region."""
    offsets, total = [], 0
    for t in tensors:
        total = -(-total // align) * align
        offsets.append(total)
        total += t.numel() * t.element_size()
    region = huge_page_empty(total)
    out = []
    for t, offset in zip(tensors, offsets, strict=True):
        view = region[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def trim_heap() -> None:
    """Give the free memory inside glibc's heaps back to the system (malloc_trim). A load frees
    hundreds of MB of temporaries (stacked and repacked copies) that glibc keeps resident
    otherwise: 245-325 MiB of the benchmark checkpoint's resident set, in ~20 ms."""
    if sys.platform.startswith("linux"):
        try:
            _libc().malloc_trim(0)
        except AttributeError:  # not glibc
            pass


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once. By default it raises its
    mmap threshold after the first large free and keeps later blocks in its heaps (one per
    thread), so evicted experts would stay in the resident set; a fixed 1 MiB threshold
    serves every expert tensor with its own mapping, unmapped when the expert is evicted."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):  # not glibc
            pass
