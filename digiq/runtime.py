"""Run-time choices that depend on the machine: dtype, int8 quantization, threads, seeds, cache folder.

CPUs differ between machines of the same kind: with bf16 instructions (AMX, avx512_bf16) bf16 matmuls beat fp32,
without them they are far slower (docs/benchmarks.md). So ``dtype: auto`` is resolved once per run from the
hardware (:func:`resolve_dtype`), never hard-coded and never timed, and the run records what it chose and why.
Where the dtype is float32 on a CPU, the frozen language model may run with int8 weights (:func:`resolve_quantize`),
chosen the same way.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from digiq.errors import DigiqError

if TYPE_CHECKING:
    import torch

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                "fp16": "float16", "float16": "float16", "half": "float16"}


def cache_dir() -> Path:
    """The digiq cache folder: ``$DIGIQ_CACHE`` or ``~/.cache/digiq`` (created on demand)."""
    root = Path(os.environ.get("DIGIQ_CACHE") or Path.home() / ".cache" / "digiq").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else is returned as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it cannot be read, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


DTYPE_ENV = "DIGIQ_DTYPE"  # float32 | bfloat16: the compute dtype wherever a setting says "auto"
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@dataclass(frozen=True)
class ComputeDtype:
    """A run's compute dtype and why it is that one (recorded in metrics and model cards)."""

    name: str  # float32 | bfloat16 | float16
    reason: str  # e.g. "auto: cpu has amx_bf16", "DIGIQ_DTYPE=float32", "finetune.dtype: bfloat16"

    @property
    def named(self) -> bool:
        """True when a setting named this dtype (rather than ``auto`` or ``$DIGIQ_DTYPE`` choosing it)."""
        return not self.reason.startswith(("auto:", f"{DTYPE_ENV}="))

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.name)


def resolve_dtype(requested: str = "auto", device: str = "auto", *, setting: str = "dtype") -> ComputeDtype:
    """The compute dtype of a run: the setting when it names one, else ``$DIGIQ_DTYPE``, else the machine's.

    The machine's choice depends on its hardware only, never on a timing, so that a busy machine computes (and
    hashes) what an idle one does:

    - CUDA: bf16 where the GPU supports it, else fp16;
    - CPU: bf16 where the CPU has bf16 instructions (``amx_bf16`` or ``avx512_bf16`` in its flags), else fp32:
      without them a bf16 matmul is far slower than fp32 (docs/benchmarks.md);
    - any other device: fp32.
    """
    if requested != "auto":
        name = dtype_name(requested)
        return ComputeDtype(name, f"{setting}: {name}")
    env = os.environ.get(DTYPE_ENV)
    if env:
        name = _DTYPE_NAMES.get(env.lower())
        if name not in ("float32", "bfloat16"):
            raise DigiqError(f"expected float32 or bfloat16, got {env!r}", field=DTYPE_ENV)
        return ComputeDtype(name, f"{DTYPE_ENV}={env}")
    device = resolve_device(device)
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_bf16_supported():
            return ComputeDtype("bfloat16", "auto: the GPU supports bf16")
        return ComputeDtype("float16", "auto: the GPU lacks bf16")
    if device != "cpu":
        return ComputeDtype("float32", f"auto: {device}")
    found = sorted(BF16_CPU_FLAGS & cpu_flags())
    if found:
        return ComputeDtype("bfloat16", f"auto: cpu has {' and '.join(found)}")
    return ComputeDtype("float32", "auto: cpu has no bf16 instructions (amx_bf16, avx512_bf16)")


QUANTIZE_ENV = "DIGIQ_QUANTIZE"  # none | int8: the frozen language model's weights wherever a setting says "auto"
QUANTIZE_NAMES = ("none", "int8")


@dataclass(frozen=True)
class Quantization:
    """How a run stores the frozen language model's linear weights, and why (recorded beside the dtype)."""

    name: str  # none | int8 (dynamic: int8 weights, activations quantized per call, float32 outside the matmuls)
    reason: str  # e.g. "auto: float32 on an x86 cpu with avx2", "DIGIQ_QUANTIZE=none", "embed.quantize: int8"


def resolve_quantize(requested: str, dtype: ComputeDtype, device: str = "auto", *,
                     setting: str = "quantize") -> Quantization:
    """The frozen language model's quantization for a run of compute dtype ``dtype``: the setting when it names
    one, else ``$DIGIQ_QUANTIZE``, else the machine's (from the hardware and the dtype, never from a timing):

    - int8 where the compute dtype is float32 by the machine's choice (``auto`` or ``$DIGIQ_DTYPE``) on an x86 CPU
      with AVX2, whose int8 matrix kernels (fbgemm) torch has;
    - none elsewhere: bf16 hardware keeps bf16, a GPU keeps its dtype, other CPUs stay float32, and a setting that
      names float32 gets float32 throughout.

    int8 needs the float32 compute dtype and a CPU (its kernels are CPU kernels)."""
    if requested != "auto":
        name, reason = requested, f"{setting}: {requested}"
    elif os.environ.get(QUANTIZE_ENV):
        name, reason = os.environ[QUANTIZE_ENV].lower(), f"{QUANTIZE_ENV}={os.environ[QUANTIZE_ENV]}"
    else:
        return _machine_quantize(dtype, resolve_device(device))
    if name not in QUANTIZE_NAMES:
        raise DigiqError(f"expected auto, none or int8, got {name!r}",
                         field=QUANTIZE_ENV if reason.startswith(QUANTIZE_ENV) else setting)
    if name == "int8" and (dtype.name != "float32" or resolve_device(device) != "cpu"):
        raise DigiqError(f"int8 runs float32 activations on the CPU; the compute dtype is {dtype.name} ({dtype.reason}) "
                         f"on {resolve_device(device)}: set the dtype to float32 (or DIGIQ_DTYPE=float32) and the "
                         "device to cpu", field=QUANTIZE_ENV if reason.startswith(QUANTIZE_ENV) else setting)
    return Quantization(name, reason)


def _machine_quantize(dtype: ComputeDtype, device: str) -> Quantization:
    if device != "cpu":
        return Quantization("none", f"auto: {device} keeps {dtype.name}")
    if dtype.name != "float32" or dtype.named:
        return Quantization("none", f"auto: the compute dtype is {dtype.name} ({dtype.reason})")
    import torch

    engines = {"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines)
    if "avx2" not in cpu_flags() or not engines:
        return Quantization("none", "auto: no x86 int8 kernels here (fbgemm needs avx2)")
    return Quantization("int8", "auto: float32 on an x86 cpu with avx2 (fbgemm int8 kernels)")


def dtype_name(name: str) -> str:
    """``"bf16"``, ``"bfloat16"``… → ``"bfloat16"`` (the torch name); an unknown name is a ValueError."""
    try:
        return _DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (expected auto, float32, bfloat16 or float16)") from None


def choose_dtype(device: str = "auto") -> torch.dtype:
    """The dtype ``"auto"`` resolves to on ``device`` (:func:`resolve_dtype`)."""
    return resolve_dtype("auto", device).torch


def dtype_from_name(name: str | torch.dtype, device: str = "auto") -> torch.dtype:
    """``"auto"`` → :func:`resolve_dtype`'s choice; ``"fp32"``/``"float32"``/``"bf16"``/… → that dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    return resolve_dtype(name, device).torch


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (default: ``$DIGIQ_THREADS``, else the CPUs this process may use divided by
    the processes a launcher started on this machine — `accelerate launch` — so that they share the cores)."""
    import torch

    if n is None:
        env = os.environ.get("DIGIQ_THREADS")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = int(env) if env else cpus // local_processes()
    n = max(1, int(n))
    torch.set_num_threads(n)
    return n


def local_processes() -> int:
    """Processes a launcher (torchrun, mpirun) started on this machine; 1 outside one."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(name)
        if value:
            return max(1, int(value))
    return 1


def quiet_transformers() -> None:
    """Silence transformers' per-call progress bars ("Loading weights", "Writing model shards") and the
    deprecation notice peft's LoRA wrapping triggers on every run (nothing a user can act on)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def timed(fn, *args, repeat: int = 3, **kwargs) -> float:  # noqa: ANN001 - tiny benchmarking helper
    """Best wall time of ``repeat`` calls of ``fn(*args, **kwargs)``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best
