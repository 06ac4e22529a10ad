"""Where a run happens: device and precision choice, threads, and the env.json record."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

# From `posleak bench` on a 2-core Sapphire Rapids CPU (AMX): bf16 autocast loses to fp32
# at d_model=128 and wins by 3-4x at d_model=512; the crossover is near 256.
BF16_CPU_MIN_WIDTH = 256


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is visible; use 'auto'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device = 'mps' but MPS is not available; use 'auto'")
    return torch.device(name)


def available_memory() -> int | None:
    """Bytes of memory this process could still allocate (Linux's MemAvailable), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(need: float, what: str, fix: str) -> None:
    """Refuse, before allocating, work whose estimated memory exceeds what is available."""
    have = available_memory()
    if have is not None and need > 0.9 * have:
        raise MemoryError(
            f"{what} needs about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} GiB is "
            f"available; {fix}"
        )


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16 instructions, read from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device, d_model: int) -> tuple[str, str]:
    """(precision, reason): `auto` picks what the benchmark found faster for this size."""
    if name != "auto":
        return name, "set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA device supports bf16"
        return "fp32", "CUDA device lacks bf16"
    if device.type == "cpu":
        if not cpu_has_fast_bf16():
            return "fp32", "CPU lacks AMX/AVX512-BF16"
        if d_model < BF16_CPU_MIN_WIDTH:
            return "fp32", f"d_model={d_model} < {BF16_CPU_MIN_WIDTH}: bf16 autocast is slower here"
        return "bf16", f"CPU has AMX/AVX512-BF16 and d_model={d_model} >= {BF16_CPU_MIN_WIDTH}"
    return "fp32", f"no bf16 default for {device.type}"


# Training FLOPs from which `train.compile = "auto"` compiles on CPU: twice the largest
# break-even measured (compile time / per-step saving: 10, 26 and 52 TFLOP at d 128, 256 and
# 512; README, Performance), so that an automatic compile pays for itself with room to spare.
COMPILE_CPU_MIN_FLOP = 100e12


def flops_per_token(model, T: int) -> float:
    """6N + 12·L·d·T, N = the block matrices and the LM head (posleak's or the reference's)."""
    n = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)
    n += model.lm_head.weight.numel()
    d = model.lm_head.weight.shape[1]
    return 6 * n + 12 * len(model.layers) * d * T


def resolve_compile(setting: bool | str, device: torch.device, flops: float) -> tuple[bool, str]:
    """(compile, reason): `auto` decides from the run's training FLOPs, never from timings, so
    the same config always makes the same choice (and gives the same numbers)."""
    if setting != "auto":
        return bool(setting), "set in the config"
    if device.type != "cpu":
        return False, (
            f"auto: torch.compile has not been measured on {device.type} in posleak; "
            "set train.compile = true to use it"
        )
    on = flops >= COMPILE_CPU_MIN_FLOP
    return on, (
        f"auto: {flops / 1e12:.3g} TFLOP of training {'>=' if on else '<'} "
        f"{COMPILE_CPU_MIN_FLOP / 1e12:.0f} TFLOP, twice the largest break-even measured on CPU"
    )


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(status.strip()) if commit else None}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(
    device: torch.device, precision: str, reason: str, world_size: int, compiled: tuple
) -> dict:
    versions = {}
    for pkg in ("posleak", "torch", "numpy", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git": git_state(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "precision": precision,
        "precision_reason": reason,
        "compile": compiled[0],
        "compile_reason": compiled[1],
    }
