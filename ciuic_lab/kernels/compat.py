"""What this machine offers the kernels: CPU vector extensions, usable cores, memory, caches, CUDA, nvcc.

Everything here is read from the OS (``/proc``, ``/sys``, ``sysconf``) or asked of the libraries
already installed; nothing is compiled, nothing fails when a part is missing (it reports ``None`` or
``False`` with the reason). ``report()`` is what ``ciuic-lab info`` prints.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


# ------------------------------------------------------------------------------ CPU
@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo (Linux), else an empty dict."""
    text = _read("/proc/cpuinfo") or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        if ":" in line:
            k, v = line.split(":", 1)
            out.setdefault(k.strip(), v.strip())
    return out


def cpu_flags() -> set[str]:
    info = _cpuinfo()
    flags = info.get("flags") or info.get("Features") or ""
    return set(flags.split())


def cpu_features() -> dict[str, bool]:
    """The vector extensions the kernels care about."""
    f = cpu_flags()
    arch = platform.machine().lower()
    arm = arch in ("aarch64", "arm64") or arch.startswith("arm")
    return {
        "avx512f": "avx512f" in f,
        "avx512bw": "avx512bw" in f,
        "avx512_vnni": "avx512_vnni" in f or "avx512vnni" in f,
        "avx512_bf16": "avx512_bf16" in f,
        "avx512_fp16": "avx512_fp16" in f,
        "amx": "amx_tile" in f,
        "avx2": "avx2" in f,
        "fma": "fma" in f,
        "f16c": "f16c" in f,
        # every AArch64 CPU has Advanced SIMD; /proc/cpuinfo calls it "asimd"
        "neon": ("asimd" in f or "neon" in f or (arm and arch in ("aarch64", "arm64"))),
        "sve": "sve" in f,
    }


def cgroup_cpu_quota() -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 ``cpu.max`` or v1 CFS), None when unlimited or unknown."""
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2:
        parts = v2.split()
        if parts and parts[0] != "max" and len(parts) >= 2:
            try:
                return int(parts[0]) / int(parts[1])
            except ValueError:
                return None
        return None
    q = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") or _read("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us")
    p = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us") or _read("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us")
    try:
        if q and p and int(q) > 0:
            return int(q) / int(p)
    except ValueError:
        pass
    return None


def affinity_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def usable_cpus() -> int:
    """CPUs this process may really use: min of the CPU count, the affinity mask and the cgroup quota."""
    n = os.cpu_count() or 1
    aff = affinity_cpus()
    if aff:
        n = min(n, aff)
    quota = cgroup_cpu_quota()
    if quota:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


# ------------------------------------------------------------------------------ memory and caches
def _meminfo() -> dict[str, int]:
    out = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * 1024
    return out


def memory() -> dict[str, int | None]:
    mi = _meminfo()
    total = mi.get("MemTotal")
    avail = mi.get("MemAvailable")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = None
    limit = None
    raw = _read("/sys/fs/cgroup/memory.max") or _read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if raw and raw.strip().isdigit():
        v = int(raw.strip())
        if total is None or v < total:
            limit = v
    return {"total_bytes": total, "available_bytes": avail, "cgroup_limit_bytes": limit}


def _size(text: str) -> int | None:
    m = re.match(r"\s*(\d+)\s*([KMG]?)", text or "")
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


@lru_cache(maxsize=1)
def caches() -> dict[str, int]:
    """Cache sizes in bytes by name (``L1d``, ``L2``, ``L3``) for CPU 0, from sysfs or sysconf."""
    out: dict[str, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    if base.is_dir():
        for d in sorted(base.glob("index*")):
            level = (_read(str(d / "level")) or "").strip()
            kind = (_read(str(d / "type")) or "").strip()
            size = _size(_read(str(d / "size")) or "")
            if not level or size is None or kind == "Instruction":
                continue
            name = f"L{level}" + ("d" if kind == "Data" else "")
            out[name] = max(size, out.get(name, 0))
    if not out:
        for name, key in (("L1d", "SC_LEVEL1_DCACHE_SIZE"), ("L2", "SC_LEVEL2_CACHE_SIZE"),
                          ("L3", "SC_LEVEL3_CACHE_SIZE")):
            try:
                v = os.sysconf(key)
                if v and v > 0:
                    out[name] = int(v)
            except (ValueError, OSError, AttributeError):
                pass
    return out


def llc_bytes(default: int = 32 << 20) -> int:
    """Size of the last-level cache (the largest level the OS reports); ``default`` when unknown."""
    c = caches()
    for name in ("L4", "L3", "L2"):
        if name in c:
            return c[name]
    return default


# ------------------------------------------------------------------------------ libraries
def numba_info() -> dict[str, Any]:
    try:
        import numba
    except Exception as exc:
        return {"available": False, "reason": str(exc)}
    out: dict[str, Any] = {"available": True, "version": numba.__version__,
                           "threads_max": numba.config.NUMBA_NUM_THREADS,
                           "threads_used_by_kernels": min(usable_cpus(), numba.config.NUMBA_NUM_THREADS),
                           "cache_dir": numba.config.CACHE_DIR or os.environ.get("NUMBA_CACHE_DIR") or None}
    try:
        import llvmlite.binding as ll

        out["llvm_cpu"] = ll.get_host_cpu_name()
    except Exception:
        pass
    return out


def torch_info() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    try:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    return out


def cuda_info() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"available": False}
    try:
        ok = torch.cuda.is_available()
    except Exception as exc:  # a broken driver must not break `info`
        return {"available": False, "reason": str(exc)}
    out["available"] = bool(ok)
    out["torch_cuda"] = torch.version.cuda
    if ok:
        out["device_count"] = torch.cuda.device_count()
        out["device"] = torch.cuda.get_device_name(0)
        cap = torch.cuda.get_device_capability(0)
        out["capability"] = f"{cap[0]}.{cap[1]}"
    return out


def nvcc_info() -> dict[str, Any]:
    path = shutil.which("nvcc")
    if path is None:
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
                path = os.path.join(home, "bin", "nvcc")
                break
    if path is None:
        return {"path": None, "version": None}
    version = None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
        m = re.search(r"release\s+([\d.]+)", out)
        version = m.group(1) if m else out.strip().splitlines()[-1] if out.strip() else None
    except (OSError, subprocess.SubprocessError) as exc:
        version = f"unknown ({exc})"
    return {"path": path, "version": version}


def backends() -> dict[str, Any]:
    from .registry import REGISTRY

    return REGISTRY.status()


def report() -> dict[str, Any]:
    """Everything above, JSON-able."""
    info = _cpuinfo()
    model = info.get("model name") or info.get("Model") or info.get("Hardware") or platform.processor() or None
    return {
        "cpu": {
            "model": model,
            "arch": platform.machine(),
            "features": cpu_features(),
            "cpu_count": os.cpu_count(),
            "affinity": affinity_cpus(),
            "cgroup_quota": cgroup_cpu_quota(),
            "usable": usable_cpus(),
            "caches": caches(),
            "llc_bytes": llc_bytes(),
        },
        "memory": memory(),
        "numba": numba_info(),
        "torch": torch_info(),
        "cuda": cuda_info(),
        "nvcc": nvcc_info(),
        "backends": backends(),
    }


__all__ = ["report", "cpu_features", "cpu_flags", "usable_cpus", "cgroup_cpu_quota", "affinity_cpus", "memory",
           "caches", "llc_bytes", "numba_info", "torch_info", "cuda_info", "nvcc_info", "backends"]
