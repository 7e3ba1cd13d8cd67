"""Load any LLaVA-style Hugging Face checkpoint from a local folder — the digiq default or llava-1.5-7b.

Never touches a model hub: ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``. A missing or invalid folder is
a :class:`~digiq.errors.DigiqError` naming the path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq.errors import DigiqError

if TYPE_CHECKING:
    import torch

    from digiq.vlm.model import VLM


def load_vlm(path: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto", *,
             adapter: str | Path | None = None, quantize: str = "none", **model_kwargs: Any) -> VLM:
    """Load the checkpoint folder ``path`` (AutoProcessor + AutoModelForImageTextToText) as a :class:`VLM`.

    ``dtype``: "auto" (chosen at run time, :func:`digiq.runtime.resolve_dtype`), "float32", "bfloat16",
    "float16" or a torch dtype. ``device``: "auto" (cuda when visible), "cpu", "cuda", "cuda:1"….
    ``adapter``: optional PEFT adapter folder (e.g. LoRA from fine-tuning) applied on top.
    ``quantize``: "none" or "int8" (:func:`quantize_language_model`: a frozen model for inference only; the
    caller resolves "auto" with :func:`digiq.runtime.resolve_quantize`).
    The tokenizer pads on the left; the model is in eval mode.
    """
    from digiq.runtime import dtype_from_name, resolve_device

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path).expanduser()
    if not path.is_dir():
        hint = "" if path.exists() else " (digiq never downloads models: give a local checkpoint folder, e.g. one written by `digiq model build`)"
        raise DigiqError(f"no model folder here{hint}", file=path)
    if not (path / "config.json").is_file():
        raise DigiqError("not a Hugging Face checkpoint folder: config.json is missing", file=path)
    device = resolve_device(device)
    torch_dtype = dtype_from_name(dtype, device)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from digiq.runtime import quiet_transformers

    quiet_transformers()
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the folder is the problem
        raise DigiqError(f"cannot load the processor: {_first_line(exc)}", file=path) from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise DigiqError(f"the processor ({type(processor).__name__}) has no tokenizer + image processor; "
                         "expected a LLaVA-style processor", file=path)
    processor.tokenizer.padding_side = "left"
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True, **model_kwargs}
    if device.startswith("cuda"):
        load_kwargs.setdefault("device_map", {"": device})  # load straight onto the GPU (7B: no CPU copy)
    try:
        model: Any = AutoModelForImageTextToText.from_pretrained(str(path), **load_kwargs)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001
        raise DigiqError(f"cannot load the model: {_first_line(exc)}", file=path) from None
    if not device.startswith("cuda"):
        model = model.to(device)
    if adapter is not None:
        model = _apply_adapter(model, Path(adapter))
    model.eval()
    if quantize == "int8":
        quantize_language_model(model)
    elif quantize != "none":
        raise DigiqError(f"unknown quantization {quantize!r} (expected none or int8)", field="quantize")

    from digiq.vlm.model import VLM

    return VLM(model, processor, device=device, dtype=torch_dtype, path=path)


def quantize_language_model(model: Any) -> None:
    """Swap the language model's ``nn.Linear`` layers, in place, for dynamically quantized ones (PyTorch's fbgemm/x86
    kernels): weights int8 per output channel, each call's input quantized to 8 bits over its own range, int32
    accumulation, float32 outside the matmuls. The vision tower, projector, embeddings and LM head stay float32.

    A row's result depends on the range of the other rows quantized with it (at quantization-noise level), so
    features are deterministic for the same inputs and batches, equal across batchings only approximately."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = getattr(getattr(base, "model", None), "language_model", None)
    if lm is None or next(lm.parameters()).dtype != torch.float32:
        raise DigiqError("int8 quantization needs a float32 LLaVA-style model (model.language_model)", field="quantize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantization and quantized tensors are deprecated, still shipped
        quantize_dynamic(lm, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def _apply_adapter(model: Any, adapter: Path) -> Any:
    if not (adapter / "adapter_config.json").is_file():
        raise DigiqError("not a PEFT adapter folder: adapter_config.json is missing", file=adapter)
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as exc:  # noqa: BLE001
        raise DigiqError(f"cannot load the adapter: {_first_line(exc)}", file=adapter) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def model_info(path: str | Path) -> dict[str, Any]:
    """A summary of a checkpoint folder without loading the weights: parameter count (from the safetensors
    headers), architecture and the main config values."""
    import json

    from dataclasses import asdict

    from digiq.vlm.prompts import ORDER_KEY, UNRECORDED_ORDER, PageReading

    path = Path(path).expanduser()
    if not path.is_dir():
        raise DigiqError("no model folder here", file=path)
    if not (path / "config.json").is_file():
        raise DigiqError("not a Hugging Face checkpoint folder: config.json is missing", file=path)
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", {}) or {}
    vision = config.get("vision_config", {}) or {}
    params, dtypes = _safetensors_params(path)
    info: dict[str, Any] = {
        "path": str(path),
        "architecture": (config.get("architectures") or ["?"])[0],
        "parameters": params,
        "dtypes": sorted(dtypes),
        "vision": {k: vision.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "image_size",
                                              "patch_size") if k in vision},
        "text": {k: text.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "vocab_size") if k in text},
        "vision_feature_layer": config.get("vision_feature_layer"),
        "vision_feature_select_strategy": config.get("vision_feature_select_strategy"),
        "image_token_id": config.get("image_token_id", config.get("image_token_index")),
        "image_seq_length": config.get("image_seq_length"),
        "prompt_order": config.get(ORDER_KEY, UNRECORDED_ORDER),
        **asdict(PageReading.of_config(config)),
    }
    build = path / "digiq_build.json"
    if build.is_file():
        info["digiq_build"] = json.loads(build.read_text())
    return info


def check_prompt_order(path: str | Path, expected: str) -> None:
    """The checkpoint at ``path`` must be prompted in the order params.yaml names (``model.prompt_order``): a
    model is read the way it was built and fine-tuned, so a disagreement is an error, not a silent choice."""
    from digiq.vlm.prompts import ORDER_KEY, UNRECORDED_ORDER

    actual = model_info(path)["prompt_order"]
    if actual != expected:
        raise DigiqError(f"the checkpoint is prompted {actual} but model.prompt_order is {expected}: rebuild the "
                         f"default (`digiq model build`) or set model.prompt_order: {actual} (a checkpoint "
                         f"without {ORDER_KEY} is {UNRECORDED_ORDER}, LLaVA's own order)",
                         file=Path(path) / "config.json", field=ORDER_KEY)


def _safetensors_params(path: Path) -> tuple[int, set[str]]:
    import json
    import math
    import struct

    total, dtypes = 0, set()
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            total += math.prod(entry["shape"])
            dtypes.add(entry["dtype"])
    return total, dtypes
