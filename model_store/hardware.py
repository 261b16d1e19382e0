"""What this machine offers: CPU ISA, cores, memory, CUDA devices, onnxruntime providers.

`detect()` is cached per process. Tests (and `FMGATE_FAKE_HARDWARE`, a JSON profile) can replace it
with `use_profile(HardwareProfile(...))`, so recipe applicability is testable without the hardware.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache

# CPU feature flags worth knowing for quantized kernels, in /proc/cpuinfo spelling.
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "fma", "f16c")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: str  # "9.0"
    memory_mb: int


@dataclass(frozen=True)
class HardwareProfile:
    arch: str  # x86_64 | aarch64 | ...
    cpu_model: str
    cores: int  # usable by this process (affinity), what intra-op threads should be
    memory_mb: int
    isa: tuple[str, ...] = ()
    cuda: tuple[CudaDevice, ...] = ()
    ort_providers: tuple[str, ...] = ()
    fake: bool = False

    def has(self, flag: str) -> bool:
        return flag in self.isa

    @property
    def has_cuda(self) -> bool:
        return bool(self.cuda)

    @property
    def isa_tier(self) -> str:
        """The best int8 kernel family onnxruntime can use here; what quantized speed depends on."""
        if self.arch in ("x86_64", "amd64", "AMD64"):
            if self.has("amx_int8"):
                return "amx"
            if self.has("avx512_vnni"):
                return "avx512_vnni"
            if self.has("avx512f"):
                return "avx512"
            if self.has("avx2"):
                return "avx2"
            return "x86"
        if self.arch in ("aarch64", "arm64"):
            return "arm64-i8mm" if self.has("i8mm") else "arm64"
        return self.arch

    @property
    def hardware_class(self) -> str:
        """Part of every cache key: artifacts measured on one class are not reused on another."""
        parts = [f"cpu-{self.isa_tier}"]
        parts += [f"cuda-sm{d.compute_capability.replace('.', '')}" for d in self.cuda]
        return "+".join(parts)

    @property
    def fingerprint(self) -> str:
        """This machine, as far as speed goes: measurements taken on another one are taken again."""
        import hashlib
        import json

        d = {"arch": self.arch, "cpu": self.cpu_model, "cores": self.cores, "isa": sorted(self.isa),
             "cuda": [[c.name, c.compute_capability] for c in self.cuda]}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["isa_tier"] = self.isa_tier
        d["hardware_class"] = self.hardware_class
        d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HardwareProfile:
        cuda = tuple(CudaDevice(**c) for c in d.get("cuda", ()))
        return cls(arch=d.get("arch", "x86_64"), cpu_model=d.get("cpu_model", "fake"),
                   cores=int(d.get("cores", 2)), memory_mb=int(d.get("memory_mb", 8192)),
                   isa=tuple(d.get("isa", ())), cuda=cuda,
                   ort_providers=tuple(d.get("ort_providers", ("CPUExecutionProvider",))),
                   fake=bool(d.get("fake", True)))


_override: HardwareProfile | None = None


def detect() -> HardwareProfile:
    """The profile of this machine (or the faked one)."""
    if _override is not None:
        return _override
    env = os.environ.get("FMGATE_FAKE_HARDWARE")
    if env:
        return HardwareProfile.from_dict({**json.loads(env), "fake": True})
    return _detect_real()


@contextmanager
def use_profile(profile: HardwareProfile) -> Iterator[HardwareProfile]:
    """Pretend to run on `profile` inside the block (unit tests)."""
    global _override
    old, _override = _override, profile
    try:
        yield profile
    finally:
        _override = old


@lru_cache(maxsize=1)
def _detect_real() -> HardwareProfile:
    arch = platform.machine() or "unknown"
    flags, model = _cpu_flags()
    return HardwareProfile(
        arch=arch,
        cpu_model=model,
        cores=_cores(),
        memory_mb=_memory_mb(),
        isa=tuple(f for f in (*ISA_FLAGS, *ARM_FLAGS) if f in flags),
        cuda=tuple(_cuda_devices()),
        ort_providers=tuple(_ort_providers()),
    )


def _cpu_flags() -> tuple[set[str], str]:
    flags: set[str] = set()
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key in ("model name", "Model") and value.strip():
                    model = value.strip()
    except OSError:
        pass
    return flags, model


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        return 0


def _ort_providers() -> list[str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception:  # noqa: BLE001 - a broken onnxruntime shows as "no providers"
        return []


def _nvidia_present() -> bool:
    """Cheap check first, so a CPU-only warm start never pays for importing torch."""
    return (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")
            or shutil.which("nvidia-smi") is not None)


def _cuda_devices() -> list[CudaDevice]:
    """torch.cuda when torch is importable and was built with CUDA; else nvidia-smi; else none."""
    if not _nvidia_present():
        return []
    try:
        import torch

        if torch.cuda.is_available():
            out = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out.append(CudaDevice(i, p.name, f"{p.major}.{p.minor}", p.total_memory // (1 << 20)))
            return out
    except Exception:  # noqa: BLE001 - fall through to nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        res = subprocess.run(
            [smi, "--query-gpu=index,name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in res.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            try:
                out.append(CudaDevice(int(parts[0]), parts[1], parts[2], int(float(parts[3]))))
            except ValueError:
                continue
    return out
