"""The model zoo: unmodified models from transformers, timm and torchvision, built from
configs with random weights (nothing is downloaded), and the inputs each one runs on.

Each entry names what it exercises (activation, block style) so the zoo's coverage can be
read off the table. The sizes are chosen so that one model's twelve-odd compiles and its
timed rounds fit a few minutes on two CPU cores; ``scale`` shrinks them further for the
CI smoke test.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def import_torchvision():
    """``import torchvision``, on a CPU-only torch too.

    The registry's torchvision wheels are built against the CUDA build of torch. On the
    CPU build their operator library (``torchvision/_C.so``) does not load; torchvision
    then runs without its detection ops, but 0.28's import still makes two fake-tensor
    registrations, for ``nms`` and ``qnms``, unconditionally, and fails on them. We define
    those two schemas (with no kernel) so that the import goes through. The
    classification models here call none of torchvision's ops; an nms call would fail
    with "no kernel", never compute something else.
    """
    try:
        import torchvision  # noqa: F401
        return torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


@dataclasses.dataclass
class ZooModel:
    name: str
    library: str  # transformers | timm | torchvision
    kind: str  # "lm" | "cnn"
    style: str  # activation and block style, for the coverage column
    build: Callable[[float], torch.nn.Module]
    #: (model, scale, generator) -> the inputs of one step
    inputs: Callable[[torch.nn.Module, float, torch.Generator], dict[str, Any]]


# ----------------------------------------------------------------------------- CNNs
CNN_BATCH, CNN_SIZE = 4, 128


def _cnn_inputs(model, scale: float, g: torch.Generator) -> dict[str, Any]:
    s = max(32, int(CNN_SIZE * scale) // 32 * 32)
    b = CNN_BATCH if scale >= 1 else 2
    return {"x": torch.randn(b, 3, s, s, generator=g)}


def _timm(name: str, **kw) -> Callable[[float], torch.nn.Module]:
    def build(scale: float) -> torch.nn.Module:
        import_torchvision()  # timm imports torchvision when it is installed
        import timm

        return timm.create_model(name, pretrained=False, num_classes=100, **kw)

    return build


def _tv(name: str, **kw) -> Callable[[float], torch.nn.Module]:
    def build(scale: float) -> torch.nn.Module:
        tv = import_torchvision()
        return getattr(tv.models, name)(weights=None, num_classes=100, **kw)

    return build


CNNS = [
    ZooModel("tv_resnet18", "torchvision", "cnn", "relu, residual", _tv("resnet18"), _cnn_inputs),
    ZooModel("tv_mobilenet_v2", "torchvision", "cnn", "relu6, depthwise, inverted residual", _tv("mobilenet_v2"),
             _cnn_inputs),
    ZooModel("tv_mobilenet_v3_small", "torchvision", "cnn", "hard-swish, SE (hard-sigmoid), depthwise",
             _tv("mobilenet_v3_small"), _cnn_inputs),
    ZooModel("tv_efficientnet_b0", "torchvision", "cnn", "silu, SE, depthwise", _tv("efficientnet_b0"), _cnn_inputs),
    ZooModel("tv_regnet_y_400mf", "torchvision", "cnn", "relu, SE, grouped, residual", _tv("regnet_y_400mf"),
             _cnn_inputs),
    ZooModel("tv_shufflenet_v2_x0_5", "torchvision", "cnn", "relu, channel shuffle, depthwise",
             _tv("shufflenet_v2_x0_5"), _cnn_inputs),
    ZooModel("timm_repvgg_a0", "timm", "cnn", "relu, re-parameterisable (3x3 + 1x1 + identity BN)",
             _timm("repvgg_a0"), _cnn_inputs),
    ZooModel("timm_mobileone_s0", "timm", "cnn", "relu, re-parameterisable, depthwise", _timm("mobileone_s0"),
             _cnn_inputs),
    ZooModel("timm_lcnet_050", "timm", "cnn", "hard-swish, SE (hard-sigmoid), depthwise", _timm("lcnet_050"),
             _cnn_inputs),
    ZooModel("timm_ghostnet_050", "timm", "cnn", "relu, ghost modules, SE (hard-sigmoid)", _timm("ghostnet_050"),
             _cnn_inputs),
    ZooModel("timm_darknet17", "timm", "cnn", "leaky relu, residual", _timm("darknet17"), _cnn_inputs),
    ZooModel("timm_resnet18_mish", "timm", "cnn", "mish, residual", _timm("resnet18", act_layer="mish"),
             _cnn_inputs),
    ZooModel("timm_cs3darknet_s", "timm", "cnn", "silu, cross-stage partial", _timm("cs3darknet_s"), _cnn_inputs),
    ZooModel("timm_resnet10t_gelu", "timm", "cnn", "gelu, residual (tiered stem)", _timm("resnet10t", act_layer="gelu"),
             _cnn_inputs),
]

# ----------------------------------------------------------------------------- causal LMs
LM_BATCH, LM_SEQ, LM_VOCAB, LM_HIDDEN = 4, 128, 32000, 256


def _lm(config_name: str, **kw) -> Callable[[float], torch.nn.Module]:
    def build(scale: float) -> torch.nn.Module:
        import_torchvision()  # transformers imports torchvision when it is installed
        import transformers

        vocab = LM_VOCAB if scale >= 1 else 16384  # the smoke size still fuses the head
        cfg = getattr(transformers, config_name)(vocab_size=vocab, **kw)
        cfg._attn_implementation = "sdpa"
        return transformers.AutoModelForCausalLM.from_config(cfg)

    return build


def _lm_inputs(model, scale: float, g: torch.Generator) -> dict[str, Any]:
    V = model.config.vocab_size
    b, s = (LM_BATCH, LM_SEQ) if scale >= 1 else (2, 32)
    ids = torch.randint(0, V, (b, s), generator=g)
    labels = ids.clone()
    labels[:, : s // 8] = -100  # a masked prompt, as instruction tuning has
    return {"input_ids": ids, "labels": labels}


_DECODER = dict(hidden_size=LM_HIDDEN, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)

LMS = [
    ZooModel("llama", "transformers", "lm", "Llama: RMSNorm, SwiGLU, GQA", _lm("LlamaConfig", **_DECODER), _lm_inputs),
    ZooModel("qwen2", "transformers", "lm", "Qwen2: qkv bias, tied-free head", _lm("Qwen2Config", **_DECODER),
             _lm_inputs),
    ZooModel("qwen3", "transformers", "lm", "Qwen3: q/k norm", _lm("Qwen3Config", head_dim=64, **_DECODER),
             _lm_inputs),
    ZooModel("mistral", "transformers", "lm", "Mistral", _lm("MistralConfig", **_DECODER), _lm_inputs),
    ZooModel("phi3", "transformers", "lm", "Phi-3: fused qkv / gate-up",
             _lm("Phi3Config", pad_token_id=0, **_DECODER), _lm_inputs),
    ZooModel("gpt2", "transformers", "lm", "GPT-2: LayerNorm, GELU, tied head",
             _lm("GPT2Config", n_embd=LM_HIDDEN, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0), _lm_inputs),
]

MODELS: dict[str, ZooModel] = {m.name: m for m in CNNS + LMS}
