"""Builds smoe's native CPU kernels (smoe/csrc/native.cpp and the files it includes) against the installed torch.

`make install` runs `pip install --no-build-isolation -e .` after torch, so the extension is
compiled for the very torch it will load into. The extension is optional: without torch at
build time, or when the compiler fails, smoe installs without it and runs PyTorch's kernels
(smoe/kernels/ops.py says so once).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def native_extension():
    if os.environ.get("SMOE_NATIVE_BUILD", "1") == "0":
        return None, build_ext
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch is not installed yet: smoe still installs, without the kernels
        print("smoe: torch is not importable at build time; building without native kernels", file=sys.stderr)
        return None, build_ext
    ext = CppExtension(
        "smoe._native",
        ["smoe/csrc/native.cpp"],  # one translation unit: it includes the files of each kernel family
        # -O3; the AVX-512 and AVX2 kernels carry their own target pragmas and run only where the CPU has them,
        # so the library itself is built for plain x86-64 and loads on any CPU; -ffp-contract=off:
        # no multiply-add the code did not write, so scalar arithmetic is the same in every variant
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-unused-parameter"],
        extra_link_args=["-fopenmp"],  # libgomp.so.1: the one torch has loaded, so one thread pool
    )
    ext.optional = True  # a failed compile is a warning, not a failed install

    class Build(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001 - any build failure means: no native kernels
                print(f"smoe: native kernels not built ({error}); smoe will use PyTorch's kernels", file=sys.stderr)

    return ext, Build


ext, build = native_extension()
setup(ext_modules=[ext] if ext else [], cmdclass={"build_ext": build})
