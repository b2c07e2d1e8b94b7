"""What machine a figure was measured on: CPU model, its vector extensions, torch threads, GPU."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the extensions that change GEMM speed


def describe() -> dict:
    """{cpu, flags (of FLAGS present), cores, torch_threads, gpu (name or None), torch}."""
    cpu, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.machine(), platform.processor()):
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return dict(cpu=cpu, flags=[f for f in FLAGS if f in flags], cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, torch=torch.__version__)


def summary(d: dict | None = None) -> str:
    """One line: 'AMD EPYC 9B14 (avx2, avx512f; 2 cores, 2 torch threads)'."""
    d = describe() if d is None else d
    gpu = f", GPU {d['gpu']}" if d.get("gpu") else ""
    return f"{d['cpu']} ({', '.join(d['flags']) or 'no AVX2'}; {d['cores']} cores, {d['torch_threads']} torch threads{gpu})"
