"""Data-parallel runs under ``accelerate launch``: which process am I, which share of the work is mine, and the
results of all processes — a thin layer over HF Accelerate's ``PartialState`` / ``Accelerator`` (the process group,
gloo on CPU, nccl on GPU), so that the stages read the same way with one process or many.

    ranks = Ranks.from_environment()           # one process: a no-op Ranks; under a launcher: PartialState
    start, end = ranks.span(len(images), 32)   # this process's contiguous share, cut at multiples of 32
    parts = ranks.gather(work(images[start:end]))   # every process's result, in rank order

Shares are contiguous and in rank order, and cut at the callers' batch boundaries, so concatenating the gathered
parts gives the rows of a one-process run in the same order, each computed in the same batch as there.
A plain ``digiq …`` run (no launcher) never imports accelerate and takes exactly the one-process code path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Set by torchrun (`accelerate launch --multi_gpu`), by mpirun (`accelerate launch --cpu --mpirun_hostfile …`)
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """True when a launcher started this process as one of several (world size > 1)."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _WORLD_SIZE_VARS)


def use_cpu() -> bool:
    """Processes run on CPU (gloo) when `accelerate launch --cpu` said so or no GPU is visible."""
    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


@dataclass
class Ranks:
    """This process's place among ``num`` data-parallel processes (``state`` None: a plain one-process run)."""

    state: Any = None  # accelerate.PartialState

    @classmethod
    def from_environment(cls, cpu: bool | None = None) -> Ranks:
        """A :class:`Ranks` joined to the launcher's process group, or the one-process no-op outside a launcher."""
        if not launched():
            return cls()
        from accelerate import PartialState

        return cls(PartialState(cpu=use_cpu() if cpu is None else cpu))

    @property
    def num(self) -> int:
        return 1 if self.state is None else int(self.state.num_processes)

    @property
    def index(self) -> int:
        return 0 if self.state is None else int(self.state.process_index)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, device: str) -> str:
        """Where this process computes: ``device`` resolved ("auto": cuda when visible). Under a launcher, "auto"
        follows the launcher (CPU processes stay on the CPU), and "auto" or "cuda" on GPUs is this process's own
        GPU (cuda:<local rank>)."""
        from digiq.runtime import resolve_device

        if self.state is not None and device in ("auto", "cuda"):
            if self.state.device.type == "cuda":
                return str(self.state.device)
            if device == "auto":
                return "cpu"
        return resolve_device(device)

    def span(self, n: int, block: int = 1) -> tuple[int, int]:
        """This process's contiguous share ``[start, end)`` of ``range(n)``: whole blocks of ``block`` items
        (the last one may be short), as even as whole blocks allow, earlier processes taking the extra ones."""
        blocks = -(-n // block)
        per, extra = divmod(blocks, self.num)
        first = self.index * per + min(self.index, extra)
        last = first + per + (1 if self.index < extra else 0)
        return min(first * block, n), min(last * block, n)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in a one-process run."""
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def gather_list(self, items: list[Any]) -> list[Any]:
        """Every process's ``items`` concatenated in rank order (``items`` itself in a one-process run)."""
        return items if self.state is None else [x for part in self.gather(items) for x in part]

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        if self.state is None:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    @staticmethod
    def module(model: Any, forward: Callable[..., Any]) -> Any:
        """A ``torch.nn.Module`` holding ``model`` (its parameters) whose forward is ``forward``: what
        ``Accelerator.prepare`` wraps in DDP when the forward pass runs through helpers, not ``model.forward``
        (DDP syncs gradients only for passes made through its own forward)."""
        return _forward_module()(model, forward)


@functools.cache
def _forward_module() -> type:
    import torch

    class ForwardModule(torch.nn.Module):
        def __init__(self, model: Any, forward: Callable[..., Any]):
            super().__init__()
            self.model, self._forward = model, forward

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self._forward(*args, **kwargs)

    return ForwardModule
