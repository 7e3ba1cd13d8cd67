"""Load an official Digi-Q / DigiRL trajectory file (``torch.save``) without executing code from it.

The official loader calls ``torch.load(weights_only=False)``, which runs whatever code the pickle carries.
Here the file is first disassembled statically and refused if it names any global outside the allow-list
(torch tensors, numpy arrays and numeric scalars), then loaded with ``torch.load(weights_only=True)`` under
that same allow-list: no other object is ever constructed.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from digiq.errors import DigiqError

# numpy dtype classes a numeric array or scalar needs (unpickling a dtype BUILDs an instance of its class)
NUMPY_DTYPE_CLASSES = (
    "BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "LongLongDType",
    "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "ULongLongDType",
    "Float16DType", "Float32DType", "Float64DType",
)  # fmt: skip


def allowed_globals() -> list[Any]:
    """The only globals an official file may name: numpy array/scalar reconstruction (numpy 1.x and 2.x
    module names) and numeric dtype classes. torch tensors are allowed by torch's weights_only loader."""
    from numpy import dtypes
    from numpy._core import multiarray

    reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    return [
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # files written with numpy 1.x
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        np.ndarray,
        np.dtype,
        *(getattr(dtypes, name) for name in NUMPY_DTYPE_CLASSES),
    ]


def load_official(path: str | Path) -> list[Any]:
    """Load an official trajectory file without executing code from it (see the module docstring)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DigiqError("no such file", file=path)
    with torch.serialization.safe_globals(allowed_globals()):
        _refuse_unlisted_globals(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DigiqError(f"refused: {_unpickling_problem(exc)}; nothing from the file was executed", file=path, field="pickle") from None
        except Exception as exc:  # malformed bytes fail anywhere in torch's parser (IndexError, KeyError, …)
            raise DigiqError(f"not a readable torch.save file ({type(exc).__name__}: {_first_line(exc)})", file=path) from None
    if not isinstance(data, (list, tuple)):
        raise DigiqError(f"expected a list of trajectories (lists of step dicts), got {type(data).__name__}", file=path)
    return list(data)


def _refuse_unlisted_globals(path: Path) -> None:
    """Disassemble the pickle of a torch.save zip (nothing is constructed) and refuse unlisted globals."""
    import torch

    if not zipfile.is_zipfile(path):
        return  # legacy format: torch's restricted unpickler refuses unlisted globals as it meets them
    try:
        unlisted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError, KeyError) as exc:
        raise DigiqError(f"refused: {_unpickling_problem(exc)}; nothing from the file was executed", file=path, field="pickle") from None
    if unlisted:
        raise DigiqError(
            f"refused: unpickling needs {', '.join(sorted(unlisted))}, which is not on the allow-list "
            "(torch tensors, numpy arrays and numeric scalars); nothing from the file was executed",
            file=path,
            field="pickle",
        )


def _unpickling_problem(exc: BaseException | str) -> str:
    """torch's weights_only refusal, in one line: the global it refused, or the opcode it cannot run."""
    text = str(exc)
    if match := re.search(r"GLOBAL ([\w.]+)", text):
        name = match.group(1) if "." in match.group(1) else f"builtins.{match.group(1)}"  # torch drops "builtins."
        return f"unpickling needs {name}, which is not on the allow-list (torch tensors, numpy arrays and numeric scalars)"
    if match := re.search(r"Unsupported operand (\d+)", text):
        opcode = pickletools.code2op.get(chr(int(match.group(1))))
        name = opcode.name if opcode else match.group(1)
        return f"the pickle uses opcode {name}, which the safe loader does not run (torch.save's default protocol 2 does not need it)"
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip()
    return f"the pickle cannot be loaded safely ({_first_line(detail)})"


def _first_line(value: object) -> str:
    lines = str(value).strip().splitlines()
    return lines[0] if lines else type(value).__name__
