"""Which autocast precision to run in: `run.precision: auto` and `--precision auto`.

"auto" picks bf16 where the device runs it natively and fp32 otherwise:
- CUDA: bf16 when the GPU has bf16 arithmetic (Ampere and newer), not emulated.
- CPU: bf16 when the CPU has AMX tiles or AVX-512 BF16 instructions (recent Xeons, Zen 4
  and newer). Elsewhere (AVX2-only CPUs, most laptops and many login nodes) bf16 autocast is
  emulated and was measured 6-7x slower than fp32 (results/perf.md), so auto means fp32.
fp16 is never picked automatically: it needs a gradient scaler and can overflow, so it is
an explicit choice. Explicit choices are kept as they are.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU, a description naming the capability)."""
    capability = torch.backends.cpu.get_cpu_capability()
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if all(callable(f) for f in probe):
        amx, avx512_bf16 = probe[0](), probe[1]()
    else:  # older torch: read the kernel's flags
        flags = _cpu_flags()
        amx, avx512_bf16 = "amx_bf16" in flags, "avx512_bf16" in flags
    native = [name for name, has in (("AMX", amx), ("AVX-512 BF16", avx512_bf16)) if has]
    if native:
        return True, f"CPU capability {capability} with {' and '.join(native)}"
    return False, f"CPU capability {capability}, no AMX or AVX-512 BF16 (bf16 would be emulated)"


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """(native bf16 on `device`, why)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.5
            ok = torch.cuda.is_bf16_supported()
        return ok, f"{name} {'has' if ok else 'has no'} native bf16"
    if device.type == "cpu":
        return cpu_bf16_support()
    return False, f"device type {device.type!r}: bf16 not known to be native"


def resolve_precision(name: str, device: torch.device | str) -> tuple[str, str]:
    """`name` (one of PRECISIONS) -> (the precision to run: fp32 | bf16 | fp16, why)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {PRECISIONS}")
    if name != "auto":
        return name, "set explicitly"
    native, why = bf16_support(torch.device(device))
    return ("bf16" if native else "fp32"), f"auto: {why}"
