"""Run-time choices that depend on the machine: dtype, threads, seeds, cache folder.

DESIGN §6: CPUs differ between machines of the same kind. On one, bf16 matmuls are faster than fp32
(avx512_bf16 / AMX); on another (AVX2 only) a bf16 matmul is orders of magnitude slower. So the dtype
is chosen at run time — from the CPU flags and a short micro-benchmark — and never hard-coded.
"""

from __future__ import annotations

import functools
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

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


def choose_dtype(device: str = "auto", *, budget_s: float = 1.0) -> torch.dtype:
    """Pick the inference dtype for ``device`` at run time.

    - CUDA: bf16 where the GPU supports it, else fp16.
    - CPU: fp32 unless bf16 matmuls measure faster here. With neither ``avx512_bf16`` nor ``amx_bf16``
      in the CPU flags bf16 is never picked (DESIGN §6: minutes for one matmul on an AVX2 EPYC);
      with them, a ~``budget_s`` micro-benchmark (the same matmul in both dtypes, in a worker thread with a
      deadline so a pathologically slow bf16 kernel cannot hang us) decides. The answer is cached per process.
    """
    import torch

    device = resolve_device(device)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device != "cpu":
        return torch.float32
    return _cpu_dtype(round(budget_s, 3))


def dtype_from_name(name: str | torch.dtype, device: str = "auto") -> torch.dtype:
    """``"auto"`` → :func:`choose_dtype`; ``"fp32"``/``"float32"``/``"bf16"``/… → that dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return choose_dtype(device)
    try:
        return getattr(torch, _DTYPE_NAMES[name.lower()])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (expected auto, float32, bfloat16 or float16)") from None


@functools.lru_cache(maxsize=None)
def _cpu_dtype(budget_s: float) -> torch.dtype:
    import torch

    flags = cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return torch.float32
    fp32 = _matmul_rate(torch.float32, budget_s / 2)
    bf16 = _matmul_rate(torch.bfloat16, budget_s / 2)
    return torch.bfloat16 if bf16 > 1.2 * fp32 else torch.float32


def _matmul_rate(dtype: torch.dtype, budget_s: float, n: int = 512) -> float:
    """Matmuls per second of an n×n matmul in ``dtype`` (0.0 when one does not finish within the budget)."""
    import threading

    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    result: dict[str, float] = {}

    def work() -> None:
        torch.mm(a, b)  # warm-up (kernel selection, packing)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < budget_s:
            torch.mm(a, b)
            count += 1
        result["rate"] = count / (time.perf_counter() - start)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout=budget_s * 4 + 1.0)
    return result.get("rate", 0.0)


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
