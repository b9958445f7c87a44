"""compat: the machine report is complete, JSON-able, and agrees with what the OS says."""

import json
import os
import platform

from ciuic_lab.kernels import compat


def test_report_is_complete_and_json():
    rep = compat.report()
    json.dumps(rep)  # JSON-able as it is
    cpu = rep["cpu"]
    assert cpu["arch"] == platform.machine()
    for key in ("avx512f", "avx2", "fma", "neon"):
        assert isinstance(cpu["features"][key], bool)
    assert 1 <= cpu["usable"] <= (os.cpu_count() or 1)
    assert cpu["llc_bytes"] > 0
    assert rep["memory"]["total_bytes"] and rep["memory"]["total_bytes"] > 0
    assert rep["torch"]["version"]
    assert rep["cuda"]["available"] in (True, False)
    assert set(rep["nvcc"]) == {"path", "version"}
    assert "torch" in rep["backends"] and rep["backends"]["torch"]["available"]
    assert "numba" in rep["backends"]
    assert rep["numba"]["available"] is True and rep["numba"]["version"]


def test_flags_agree_with_proc_cpuinfo():
    if not os.path.exists("/proc/cpuinfo"):
        return
    text = open("/proc/cpuinfo").read()
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    feats = compat.cpu_features()
    assert feats["avx2"] == ("avx2" in flags)
    assert feats["avx512f"] == ("avx512f" in flags)
    assert feats["fma"] == ("fma" in flags)


def test_usable_cpus_respects_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(compat, "affinity_cpus", lambda: 3)
    monkeypatch.setattr(compat, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert compat.usable_cpus() == 3
    monkeypatch.setattr(compat, "cgroup_cpu_quota", lambda: 1.5)
    assert compat.usable_cpus() == 2
    monkeypatch.setattr(compat, "cgroup_cpu_quota", lambda: 0.25)
    assert compat.usable_cpus() == 1


def test_cgroup_quota_parsing(monkeypatch):
    files = {"/sys/fs/cgroup/cpu.max": "200000 100000\n"}
    monkeypatch.setattr(compat, "_read", lambda p: files.get(p))
    assert compat.cgroup_cpu_quota() == 2.0
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert compat.cgroup_cpu_quota() is None
    files.clear()
    files.update({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "50000", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"})
    assert compat.cgroup_cpu_quota() == 0.5
    files["/sys/fs/cgroup/cpu/cpu.cfs_quota_us"] = "-1"
    assert compat.cgroup_cpu_quota() is None


def test_llc_from_sysfs_or_default(monkeypatch):
    monkeypatch.setattr(compat, "caches", lambda: {"L1d": 48 << 10, "L2": 2 << 20, "L3": 480 << 20})
    assert compat.llc_bytes() == 480 << 20
    monkeypatch.setattr(compat, "caches", lambda: {})
    assert compat.llc_bytes(default=123) == 123


def test_nvcc_absent_is_not_an_error(monkeypatch):
    monkeypatch.setattr(compat.shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setattr(compat.os.path, "isfile", lambda p: False)
    assert compat.nvcc_info() == {"path": None, "version": None}


def test_numba_threads_capped_by_usable_cpus():
    info = compat.numba_info()
    assert info["threads_used_by_kernels"] <= compat.usable_cpus()
