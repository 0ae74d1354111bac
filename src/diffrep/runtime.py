"""Device, precision and thread settings resolved from the `runtime` params.

`runtime.precision: auto` is bf16 autocast on CUDA. On a CPU it is bf16 only for the stages in
CPU_BF16, and only when the CPU computes bf16 natively (AVX512-BF16 or AMX); everywhere else it is
fp32, so a CPU without native bf16 trains exactly as `precision: fp32` does. The table is declared
here, once, from a benchmark and a quality check - never from a timing taken at run time, so the
same params give the same precision on the same kind of CPU. `fp32` and `bf16` always force.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from diffrep.config import RuntimeConfig

# Stages whose training runs in bf16 autocast under `precision: auto` on a CPU with native bf16, with the
# measurement that earned the entry. Source: `python -m bench.cpu_precision` (bench/results/cpu_precision.json:
# fp32 vs bf16 training img/s, interleaved) and the paired val probe/kNN check of docs/studies/cpu-precision.md.
# A stage is listed only if bf16 paid >= 10% AND its val quality held; re-measure before adding one.
# Measured on an AMD EPYC with avx512_bf16: ldae +22% and ul_stage2 +29% img/s, the others 7-11% slower; l-DAE's
# val kNN/probe did not hold (fp32 better in all four paired comparisons, one at p = 0.03), so it is not listed;
# UL stage 2's val FD and val loss did (FD 0.974 vs 0.957, paired p = 0.95; val loss 0.02327 vs 0.02319).
CPU_BF16: dict[str, str] = {"ul_stage2": "+29% img/s (AMD EPYC avx512_bf16)"}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    attention: str  # backend name as configured; resolved per call (see nn.attention)
    compile: bool
    channels_last: bool
    precision_reason: str = ""  # how runtime.precision resolved here, for the stage's lineage

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def precision_record(self) -> dict[str, str]:
        """For lineage.precision: what the training step ran in and why (two machines' numbers differ by it)."""
        out = {"training": self.precision, "reason": self.precision_reason,
               "evaluation": "fp32 (features, probes, metrics and samples are computed without autocast)"}
        if self.device.type == "cpu":
            out["cpu"] = cpu_bf16()
        return out


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16() -> dict:
    """This CPU's bf16 support: ATen's vector capability, and whether bf16 dot products are native."""
    flags = _cpu_flags()
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private in torch 2.x: fall back to the flags
    avx512_bf16 = bool(probe()) if probe else "avx512_bf16" in flags
    amx_bf16 = "amx_bf16" in flags or (not flags and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: 0)()))
    return {"capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": avx512_bf16,
            "amx_bf16": amx_bf16, "native_bf16": avx512_bf16 or amx_bf16}


def cpu_precision(stage: str | None, cpu: dict) -> tuple[bool, str]:
    """`precision: auto` on a CPU: (use bf16?, why), from CPU_BF16 and the CPU's native bf16 support."""
    native = [k for k in ("amx_bf16", "avx512_bf16") if cpu.get(k)]
    if stage not in CPU_BF16:
        return False, f"auto: fp32 on cpu ({stage or 'this run'} is not in runtime.CPU_BF16)"
    if not native:
        return False, f"auto: fp32 on cpu (no native bf16: neither avx512_bf16 nor amx_bf16; {stage} would pay " \
                      f"{CPU_BF16[stage]} only with it)"
    return True, f"auto: bf16 on cpu ({native[0]}; {stage} pays {CPU_BF16[stage]})"


def resolve_runtime(cfg: RuntimeConfig, stage: str | None = None, *, cpu: dict | None = None) -> Runtime:
    """stage: the stage (model) name `precision: auto` looks up in CPU_BF16; cpu: cpu_bf16() (tests pass a fake)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available; set runtime.device: auto or cpu")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and torch.distributed.is_available() and torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.precision != "auto":
        bf16, why = cfg.precision == "bf16", f"forced: runtime.precision is {cfg.precision}"
    elif device.type == "cuda":
        bf16, why = True, "auto: bf16 on cuda"
    else:
        bf16, why = cpu_precision(stage, cpu if cpu is not None else cpu_bf16())
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, torch.bfloat16 if bf16 else None, cfg.attention, cfg.compile, cfg.channels_last, why)
