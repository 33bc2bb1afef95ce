"""Where the models run, and what that hardware does fast.

``"auto"`` (the default everywhere) means ``$ROUTERRETRIEVER_DEVICE`` when set, else the first
CUDA GPU torch sees, else the CPU. Everything else follows the encoder's device: corpus
passes, expert training, routing passes; vectors come back to the CPU as ``numpy`` arrays, and
search (FAISS, BM25, Milvus) stays on the CPU.

    >>> resolve_device("auto")      # device(type='cuda', index=0) on a GPU machine
    >>> has_fast_bfloat16("cpu")    # True on CPUs with AVX512-BF16 or AMX
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

DEVICE_ENV = "ROUTERRETRIEVER_DEVICE"

__all__ = ["DEVICE_ENV", "describe", "has_fast_bfloat16", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device ``device`` names (module docstring for ``"auto"``), checked: a GPU that
    is not there is an error here rather than deep inside the first forward pass."""
    name = str(device) if isinstance(device, torch.device) else device.strip()
    field = "device"
    if name == "auto" and os.environ.get(DEVICE_ENV, "").strip():
        name, field = os.environ[DEVICE_ENV].strip(), f"${DEVICE_ENV}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wrong = f"{field} must be auto, cpu, cuda or cuda:N; got {name[:40]!r}"
    try:
        out = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(wrong) from None
    if out.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field} {name!r}: torch sees no CUDA GPU here (try cpu or auto)")
        if out.index is not None and out.index >= torch.cuda.device_count():
            raise ValueError(
                f"{field} {name!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)"
            )
    elif out.type != "cpu":
        raise ValueError(wrong)
    return out


def has_fast_bfloat16(device: str | torch.device = "cpu") -> bool:
    """True where bfloat16 matmuls run natively (CUDA with bf16, x86 CPUs with AVX512-BF16 or
    AMX): there a bfloat16 pass is faster than float32; elsewhere it would be emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, stay with float32
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What ran the models, for a results file: scores move in the last digits from one
    processor to another (bfloat16 where it is native; training is not bit-reproducible
    across CPUs), so a number is read with the hardware that made it."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "name": name,
        "bfloat16_native": has_fast_bfloat16(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
