"""What the figures were measured on: CPU, cores, memory, tool versions, load."""

from __future__ import annotations

import os
import platform
import subprocess


def _first(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "?"
    return (out.strip().splitlines() or ["?"])[0]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_gib() -> float:
    with open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
    return round(kib / 1024 / 1024, 1)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nbdkit": _first(["nbdkit", "--version"]),
        "qemu_img": _first(["qemu-img", "--version"]),
        "nbdcopy": _first(["nbdcopy", "--version"]),
        "load_start": load(),
    }
