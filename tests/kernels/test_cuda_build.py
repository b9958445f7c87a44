"""The CUDA backend where CI runs (no GPU): the sources compile with this machine's nvcc, the header is
the cffi cdef, the backend says it is unavailable without crashing, and the library cache refuses
what it should."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ciuic_lab.errors import KernelError
from ciuic_lab.kernels import REGISTRY
from ciuic_lab.kernels import cuda as kc
from ciuic_lab.quant import QuantSpec

NATIVE = Path(__file__).resolve().parents[2] / "native"
needs_nvcc = pytest.mark.skipif(kc.find_nvcc() is None, reason="nvcc not installed here")


def test_native_sources_found():
    assert kc.native_dir() == NATIVE


def test_wheel_carries_the_sources():
    """An installed package (no checkout around it) finds the sources in ciuic_lab/_native: that is a
    link to native/, and pyproject's package data takes every source through it."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    link = root / "ciuic_lab" / "_native"
    assert link.is_symlink() and link.resolve() == (root / "native").resolve()
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ciuic_lab"]
    sources = [p.name for p in (root / "native").iterdir() if p.suffix in (".cu", ".cuh", ".h")]
    assert "ciuic_kernels.h" in sources and "api.cu" in sources
    for name in sources:
        assert any(fnmatch.fnmatch(f"_native/{name}", g) for g in globs), f"{name} is not in the wheel"
    assert (link / "ciuic_kernels.h").read_bytes() == (root / "native" / "ciuic_kernels.h").read_bytes()


def test_header_is_the_cffi_cdef():
    ffi = kc.make_ffi()
    lib = ffi.dlopen(None)  # constants of the cdef, without the library
    assert lib.CIUIC_TILE_N == 16 and lib.CIUIC_TILE_K == 64 and lib.CIUIC_MAX_M == 32
    # every declared function is defined, with C linkage, in the sources
    decls = set(re.findall(r"\b(ciuic_\w+)\s*\(", kc.cdef_text()))
    assert {"ciuic_wgemm", "ciuic_moe_gate_up", "ciuic_moe_down", "ciuic_repack_int", "ciuic_repack_fp8"} <= decls
    src = "".join((NATIVE / s).read_text() for s in kc.SOURCES)
    for name in decls:
        assert re.search(r'extern "C"[^;{]*\b' + name + r"\s*\(", src), f"{name} is declared but not defined"


def test_cdef_block_is_plain_c():
    text = kc.cdef_text()
    assert "#include" not in text and "extern" not in text and "cudaStream_t" not in text


def test_backend_unavailable_cleanly():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    ok, why = kc.CUDA.available()
    assert ok is False and "GPU" in why
    st = REGISTRY.status()["cuda"]
    assert st["available"] is False and st["device"] == "cuda"
    spec = QuantSpec(bits=4, group=128)
    assert REGISTRY.pick("cuda", spec, "rowmajor").name == "torch"  # falls back to the oracle
    with pytest.raises(KernelError, match="not available"):
        REGISTRY.pick("cuda", spec, "rowmajor", kernel="cuda")


def test_import_without_cffi_registers_unavailable():
    code = ("import sys; sys.modules['cffi'] = None\n"
            "from ciuic_lab.kernels import REGISTRY\n"
            "st = REGISTRY.status()['cuda']\n"
            "assert st['available'] is False and 'cffi' in st['reason'], st\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_supports():
    b = kc.CUDA
    assert b.supports(QuantSpec(bits=4, group=128), "rowmajor", 1)
    assert b.supports(QuantSpec(bits=4, scheme="sym", group="channel"), "cuda_i4x16", 7)
    assert b.supports(QuantSpec(bits=8, group=256), "auto", 40)
    assert b.supports(QuantSpec(bits=8, format="fp8_e4m3"), "cuda_f8x16", 1)
    assert not b.supports(QuantSpec(bits=4, group=128), "cuda_i8x16", 1)   # another format's layout
    assert not b.supports(QuantSpec(bits=4, group=32), "rowmajor", 1)      # groups below a tile
    assert not b.supports(QuantSpec(bits=4, group=192), "rowmajor", 1)     # not 64 * 2^j
    assert not b.supports(QuantSpec(bits=3, group=128), "rowmajor", 1)
    assert not b.supports(QuantSpec(), "rowmajor", 1)                       # keep


def test_cache_dir_is_private(tmp_path):
    d = tmp_path / "c"
    kc.private_dir(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.chmod(d, 0o755)
    kc.private_dir(d)  # ours: tightened
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(KernelError, match="not a plain directory"):
        kc.private_dir(link)


def test_cache_dir_of_another_user_refused(tmp_path, monkeypatch):
    d = tmp_path / "c"
    d.mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(d).st_uid + 1)
    with pytest.raises(KernelError, match="belongs to uid"):
        kc.private_dir(d)


def _fake_library(tmp_path) -> Path:
    d = kc.private_dir(tmp_path / "cache")
    lib = d / "libciuic_kernels-0123456789abcdef01234567.so"
    lib.write_bytes(b"\x7fELF not really a library")
    os.chmod(lib, 0o700)
    (d / (lib.name + ".sha256")).write_text(f"{kc.sha256_file(lib)}  {lib.name}\n")
    return lib


def test_tampered_library_refused(tmp_path):
    lib = _fake_library(tmp_path)
    with open(lib, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(KernelError, match="does not match its recorded sha256"):
        kc.open_library(lib)


def test_library_without_record_refused(tmp_path):
    lib = _fake_library(tmp_path)
    lib.with_name(lib.name + ".sha256").unlink()
    with pytest.raises(KernelError, match="no recorded sha256"):
        kc.open_library(lib)


def test_world_writable_library_refused(tmp_path):
    lib = _fake_library(tmp_path)
    os.chmod(lib, 0o777)
    with pytest.raises(KernelError, match="writable by others"):
        kc.open_library(lib)


@needs_nvcc
def test_sources_compile_and_open(tmp_path, monkeypatch):
    """The real build: every source through this machine's nvcc, linked, recorded, checked and opened
    (dlopen needs no GPU). One target (the newest, plus its PTX) keeps the suite fast; the backend's own
    build adds sm_80 with the same sources and flags."""
    monkeypatch.setattr(kc, "ARCHS", kc.ARCHS[-1:])
    cache = tmp_path / "cache"
    lib = kc.build(cache_dir=cache)
    assert lib.parent == cache and lib.is_file()
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    record = lib.with_name(lib.name + ".sha256").read_text().split()[0]
    assert record == kc.sha256_file(lib)
    assert kc.build(cache_dir=cache) == lib  # cached: no rebuild
    ffi, handle = kc.open_library(lib)
    assert handle.ciuic_abi_version() == handle.CIUIC_ABI_VERSION
    # the backend's staging names and block shapes are the header's
    assert len(kc.STAGE_NAMES) == handle.CIUIC_STAGE_PIPE + 1
    assert kc.STAGE_GEMV == handle.CIUIC_STAGE_GEMV
    assert (kc.GEMV_MAX_M, kc.GEMV_AUTO_M) == (handle.CIUIC_GEMV_MAX_M, handle.CIUIC_GEMV_AUTO_M)
    assert kc.STAGE_PIPE == handle.CIUIC_STAGE_PIPE and kc.STAGE_NAMES[kc.STAGE_PIPE] == "pipe"
    for (r, s), code in kc.STAGE_GEMV_RS.items():
        assert getattr(handle, f"CIUIC_STAGE_GEMV_{r}X{s}") == code
        assert kc.STAGE_NAMES[code] == f"gemv-{r}x{s}"
    assert b"group" in ffi.string(handle.ciuic_error_string(handle.CIUIC_ERR_GROUP))
    assert b"illegal memory access" in ffi.string(handle.ciuic_error_string(700))
    out = ffi.new("int64_t[3]")
    assert handle.ciuic_layout_bytes(0, 18432, 7168, 56, out) == 0
    assert list(out) == [18432 * 7168 // 2, 18432 * 56 * 2, 18432 * 56]  # same bytes as the row-major format
    # argument checks answer before anything touches a GPU
    auto = handle.CIUIC_STAGE_AUTO
    assert handle.ciuic_wgemm(0, 0, ffi.NULL, 1, 16, 128, ffi.NULL, ffi.NULL, ffi.NULL, 96, 2, ffi.NULL, ffi.NULL,
                              ffi.NULL, 0, 0, auto, ffi.NULL) == handle.CIUIC_ERR_GROUP
    assert handle.ciuic_wgemm(7, 0, ffi.NULL, 1, 16, 128, ffi.NULL, ffi.NULL, ffi.NULL, 128, 1, ffi.NULL, ffi.NULL,
                              ffi.NULL, 0, 0, auto, ffi.NULL) == handle.CIUIC_ERR_FORMAT
    assert handle.ciuic_moe_gate_up(0, 0, ffi.NULL, 1, 2, ffi.NULL, 4, ffi.NULL, ffi.NULL, ffi.NULL, 128, 24, 128, 1,
                                    ffi.NULL, ffi.NULL, 0, 0, auto, ffi.NULL) == handle.CIUIC_ERR_SHAPE
