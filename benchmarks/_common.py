"""Shared by the benchmarks: the machine's description and the default model's data."""

from __future__ import annotations

import platform
import subprocess
import time

import torch


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The lscpu flags that decide precision (empty where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    lines = [ln for ln in out.splitlines() if ln.startswith("Flags")]
    flags = lines[0].split(":", 1)[1].split() if lines else []
    return [f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}]


def matmul_peak_gflops(
    dtype: torch.dtype, n: int = 2048, repeats: int = 10, rounds: int = 5
) -> float:
    """GFLOP/s of an n x n matrix product in `dtype` on this machine: the best of
    `rounds` timings of `repeats` products (a shared machine's noise only lowers it)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best
