"""Memory of one LoRA training step at llava-1.5-7b's widths, to size `profiles/llava-1.5-7b.yaml`.

    python benchmarks/lora_memory.py [--layers 1,2] [--batches 1,2] [--json benchmarks/lora_memory.json]

A 7B checkpoint cannot be fetched here, so this measures what scales: LLaVA models with llava-1.5-7b's widths
(CLIP-L/336 vision features: 576 tokens of 1024; Llama-2-7B decoder: hidden 4096, MLP 11008, 32 heads; vocab
32064) but only 1 or 2 decoder layers. For each (layers, batch) point the model is wrapped for LoRA exactly as
`digiq finetune` does (`digiq.finetune.make_trainable`, r 16, the default targets) and runs one forward + backward
+ AdamW step of the stage's loss on cached vision features and real prompts.

What is counted is exact, not sampled: the bytes autograd keeps for the backward pass (every tensor the forward
saves, through ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded), and the
trained parameters with their gradients and AdamW state. Process RSS was tried first and rejected: glibc's
arenas made it swing widely between identical runs (docs/benchmarks.md). The points fix

    saved(L, b) = b·(a_0 + a_layer·L)

a_layer: activations per sample and decoder layer; a_0: per sample outside the layers (projector, embeddings,
head). The extrapolation to 32 layers is printed beside the measured points and labelled as such. Measured in
float32 on CPU; the profile's bf16 autocast saves matmul outputs in bf16, so on the GPU these figures are an
upper bound for the activations. Not counted: the frozen bf16 weights (13.2 GiB, added in the total), transient
buffers inside one op, and the CUDA context and allocator slack.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 1024**3
# llava-1.5-7b-hf (CLIP-L/336 + projector + Llama-2-7B): its config's LlavaForConditionalGeneration counted on the meta device
LLAVA_7B = {"params": 7_063_427_072, "layers": 32}


def build_vlm(layers: int):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from digiq.vlm.build import build_processor, build_tokenizer
    from digiq.vlm.model import VLM

    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return VLM(model, build_processor(tokenizer, 336), device="cpu", dtype=torch.float32)


def measure_point(layers: int, batch: int) -> dict[str, float]:
    """Bytes saved for backward and trained-state bytes of one training step."""
    import torch

    from digiq import finetune as F
    from digiq.config import FinetuneParams
    from digiq.schema import Action
    from digiq.vlm.model import VLM
    from digiq.vlm.prompts import build_prompt

    vlm = build_vlm(layers)
    model = F.make_trainable(vlm, FinetuneParams(lora_r=16, lora_alpha=32))
    tvlm = VLM(model, vlm.processor, device="cpu", dtype=torch.float32)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=2e-4)
    actions = [Action.tap(0.3 + 0.01 * i, 0.4) for i in range(batch)]
    prompts = [build_prompt("Click on the \"Submit\" button.", "", a, None, marker="patch") for a in actions]
    features = torch.randn(batch, 576, 1024)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = tvlm.yes_no_logits(tvlm.project(features), prompts, actions, image_sizes=[(336, 336)] * batch,
                                    prefix_cache=False)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long))
    loss.backward()
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    n_trained = sum(p.numel() for p in trained)
    tokens = len(vlm.tokenizer(prompts[0])["input_ids"]) + 576
    return {"layers": layers, "batch": batch, "tokens": tokens, "saved_bytes": sum(saved.values()),
            "trained_params": n_trained, "trained_state_bytes": n_trained * 4 * 2 + state}


def fit(points: list[dict[str, float]]) -> dict[str, float]:
    import numpy as np

    x = np.array([[p["batch"], p["batch"] * p["layers"]] for p in points], dtype=float)
    y = np.array([p["saved_bytes"] for p in points], dtype=float)
    (a0, a_layer), *_ = np.linalg.lstsq(x, y, rcond=None)
    x_state = np.array([[1.0, p["layers"]] for p in points])
    (s0, s_layer), *_ = np.linalg.lstsq(x_state, np.array([p["trained_state_bytes"] for p in points], dtype=float), rcond=None)
    return {"per_sample_bytes": float(a0), "per_sample_layer_bytes": float(a_layer),
            "state_bytes": float(s0), "state_per_layer_bytes": float(s_layer)}


def step_bytes(model: dict[str, float], layers: int, batch: int) -> float:
    return (model["state_bytes"] + layers * model["state_per_layer_bytes"]
            + batch * (model["per_sample_bytes"] + layers * model["per_sample_layer_bytes"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="1,2")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import gc

    points = []
    for layers in map(int, args.layers.split(",")):
        for batch in map(int, args.batches.split(",")):
            points.append(measure_point(layers, batch))
            gc.collect()
            p = points[-1]
            print(f"measured: {layers} layer(s), batch {batch} ({p['tokens']} tokens/sample): "
                  f"{p['saved_bytes'] / GIB:.3f} GiB saved for backward, trained state "
                  f"{p['trained_state_bytes'] / GIB:.3f} GiB ({p['trained_params']:,} trained parameters)", flush=True)
    model = fit(points)
    weights_bf16 = 2 * LLAVA_7B["params"]
    print(f"fit: {model['per_sample_layer_bytes'] / GIB:.3f} GiB per sample per decoder layer, "
          f"{model['per_sample_bytes'] / GIB:.3f} GiB per sample outside them; trained state "
          f"{model['state_per_layer_bytes'] / GIB:.4f} GiB per layer + {model['state_bytes'] / GIB:.3f} GiB")
    projection = {}
    for batch in (1, 4, 8, 16):
        projection[batch] = (weights_bf16 + step_bytes(model, LLAVA_7B["layers"], batch)) / GIB
        print(f"extrapolated to llava-1.5-7b (32 layers), batch {batch}: {projection[batch]:.1f} GiB "
              f"(bf16 weights {weights_bf16 / GIB:.1f} GiB + fp32 activations and trained state)")
    if args.json:
        Path(args.json).write_text(json.dumps({"points": points, "fit": model, "extrapolated_gib": projection,
                                               "note": "fp32 on CPU, 1-2 decoder layers at 7B widths; 32 layers extrapolated"},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
