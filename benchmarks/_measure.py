"""Shared measurement helpers of the benchmarks: machine line, interleaved timing, peak memory.

Time: CPU time of this process (``time.process_time``; with one torch thread it is the compute
time and barely moves when other jobs share the cores) and wall-clock, both reported. Candidates
are timed in alternating rounds (A, B, A, B, ...) so that both see the same machine state; a
ratio is the median over rounds of the per-round ratio.

Peak memory on CPU: there is no allocator counter like ``torch.cuda.max_memory_allocated``, and
``tracemalloc`` does not see torch's allocations. Each measurement runs in a fresh child process
(``python <script> --memory-child <json>``) that builds its inputs, runs the measured call once to
warm up, frees what it can (``gc`` + glibc ``malloc_trim``), resets the kernel's peak-RSS mark
(``echo 5 > /proc/self/clear_refs``), reads the resident set (VmRSS, the baseline: weights and
inputs), runs the call again and reads the high-water mark (VmHWM). The child runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so that large tensors are returned to the kernel when freed and
the resident set follows the live tensors. Reported: the total peak (VmHWM, like a GPU's peak
allocated memory it includes weights and inputs) and the peak above the baseline (activations).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def machine_line() -> str:
    """CPU model, cores, memory, torch version and threads, load average (others share the cores)."""
    import torch

    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, no GPU used; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s); load average {load}")


def timed(fn: Callable[[], object]) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, user-mode CPU seconds) of one call. CPU time includes the
    kernel's (page faults of fresh allocations); user time is the computation alone."""
    c0, w0, u0 = time.process_time(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    fn()
    return (time.process_time() - c0, time.perf_counter() - w0,
            resource.getrusage(resource.RUSAGE_SELF).ru_utime - u0)


def alternate(fns: dict[str, Callable[[], object]], rounds: int, warmup: bool = True) -> dict[str, list[tuple]]:
    """Time each candidate once per round, in alternating order; returns (cpu, wall, user) per round."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            gc.collect()
            times[name].append(timed(fns[name]))
    return times


CPU, WALL, USER = 0, 1, 2


def ratio(times: dict[str, list[tuple]], num: str, den: str, wall: bool = False, kind: int | None = None) -> float:
    """Median over rounds of time[num] / time[den] (CPU time, wall-clock if ``wall``, or ``kind``)."""
    i = kind if kind is not None else (WALL if wall else CPU)
    return statistics.median(a[i] / b[i] for a, b in zip(times[num], times[den]))


def median(times: list[tuple], wall: bool = False, kind: int | None = None) -> float:
    i = kind if kind is not None else (WALL if wall else CPU)
    return statistics.median(t[i] for t in times)


# -- peak memory in a fresh child process ------------------------------------------------------
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def measure_in_child(run: Callable[[], object], warmup: Callable[[], object] | None = None) -> None:
    """Child side: warm up (``warmup``, e.g. a shorter input, else ``run``), trim, reset the peak
    mark, run, print one JSON line of bytes."""
    (warmup or run)()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    base = _status()["VmRSS"]
    run()
    peak = _status()["VmHWM"]
    print("MEMORY " + json.dumps({"baseline": base, "peak": peak, "delta": peak - base}), flush=True)


def peak_memory(script: str, spec: dict) -> dict[str, int]:
    """Run ``script --memory-child <spec>`` in a fresh process; its baseline/peak/delta bytes."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, script, "--memory-child", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def linux_peak_rss_available() -> bool:
    return Path("/proc/self/clear_refs").exists()


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (printed, and pasted into benchmarks/README.md)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
