"""Our native forward pass (llama.c beside this file): compiled on first use, on the machine that
runs it, with the processor's own vector instructions (-march=native), and loaded with ctypes.

Compiled here rather than shipped as a binary because machines of one kind differ (AVX2 only,
AVX-512, AMX): a binary built for one would be slow or illegal on another. The library lives in
the cache directory under a name keyed by the source, the compiler and the processor's flags, so
a changed source or a different processor builds afresh and a second process reuses the first's.
Without a C compiler `available()` says why, and the formats that need it are not offered.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("llama.c"), Path(__file__).with_name("threads.c"))
_threads = 1  # what set_threads asked for; applied when the library loads
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-pthread")


class QMatrix(ctypes.Structure):
    _fields_ = [
        ("rows", ctypes.c_int32),
        ("cols", ctypes.c_int32),
        ("kind", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("q", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
    ]


class Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv_bias", ctypes.c_void_p),
        ("qkv", QMatrix),
        ("out", QMatrix),
        ("gate_up", QMatrix),
        ("down", QMatrix),
    ]


class Model(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("inter", ctypes.c_int32),
        ("n_layers", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("rope_scale", ctypes.c_float),
        ("inv_freq", ctypes.c_void_p),
        ("embedding", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("head", QMatrix),
        ("layers", ctypes.POINTER(Layer)),
    ]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _processor_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not)."""
    from specdec.models import cache_dir, partial_path

    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return None, f"{compiler} does not run: {error}"
    recipe = "\n".join([*(source.read_text() for source in SOURCES), version, " ".join(FLAGS), _processor_flags()])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    library = cache_dir() / "native" / f"llama-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(library)
        built = subprocess.run([compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES), "-lm"], capture_output=True, text=True)
        if built.returncode != 0:
            return None, f"{compiler} failed on {', '.join(s.name for s in SOURCES)}: {built.stderr.strip()[-500:]}"
        partial.replace(library)  # atomic: a concurrent builder's rename leaves one whole file
        log.info("compiled %s into %s", ", ".join(s.name for s in SOURCES), library)
    lib = ctypes.CDLL(str(library))
    lib.specdec_native_isa.restype = ctypes.c_char_p
    lib.specdec_forward.restype = ctypes.c_int
    lib.specdec_gemm.restype = ctypes.c_int
    lib.specdec_set_threads.restype = ctypes.c_int
    lib.specdec_set_threads(_threads)
    return lib, ""


def library() -> ctypes.CDLL:
    """The loaded library; RuntimeError saying why when it cannot be built."""
    lib, why = _build()
    if lib is None:
        raise RuntimeError(f"the native forward pass is not available: {why}")
    return lib


def set_threads(threads: int) -> int:
    """Split every product over `threads` threads from now on (1, the default: none started), for
    a service that owns that many cores (its --threads); returns the number in use (applied when
    the library loads, if it has not yet). Results are the same bits for any number
    (specdec/native/threads.c)."""
    global _threads
    _threads = max(1, threads)
    if not _build.cache_info().currsize:
        return _threads
    lib, _ = _build()
    return lib.specdec_set_threads(_threads) if lib is not None else _threads


def available() -> tuple[bool, str]:
    """(True, the vector path it uses) or (False, why not)."""
    lib, why = _build()
    return (True, lib.specdec_native_isa().decode()) if lib is not None else (False, why)
