"""Model shapes as data -> Hugging Face decoder LMs (OPT, Qwen2, Llama/SmolLM2) over the page vocabulary.

A `Preset` is a family-neutral shape (width, depth, heads, FFN size). Generic presets (`tiny`, `small`,
`base`) fit every family; the paper's presets copy the published config.json of a released model and
keep its family. The vocabulary is always the page vocabulary, so embeddings and the output head are
new; `init_from` loads everything else from released weights when a user has them on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hetlm.tokenizer import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger(__name__)

# Llama is the default: RoPE needs no position table (nothing tied to max length), and SwiGLU + RMSNorm
# is the shape of today's small LMs (SmolLM2 is the paper's Llama-family model). Qwen2 is the same
# block plus q/k/v biases; OPT (learned positions, ReLU) is kept for the paper's OPT results.
DEFAULT_FAMILY = "llama"
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "opt": (OPTConfig, OPTForCausalLM),
}


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None  # grouped-query attention; None = one kv head per query head
    tie_word_embeddings: bool = True
    family: str | None = None  # released architectures belong to one family; generic shapes to all
    extra: dict = field(default_factory=dict)  # family-specific config.json keys, passed verbatim


PRESETS: dict[str, Preset] = {
    # ~1M / ~5M / ~20M parameters with a 3k-page vocabulary (Llama, Qwen2; OPT, whose MLP has 2 matrices
    # not 3, is 7-22% smaller).
    "tiny": Preset(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
    "small": Preset(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "base": Preset(hidden_size=384, num_layers=8, num_heads=6, intermediate_size=1536),
    # Published config.json values of the paper's models (vocab replaced by the page vocabulary).
    "opt-350m": Preset(
        hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, family="opt",
        extra={"word_embed_proj_dim": 512, "do_layer_norm_before": False, "activation_function": "relu",
               "dropout": 0.1, "attention_dropout": 0.0},
    ),
    "opt-2.7b": Preset(
        hidden_size=2560, num_layers=32, num_heads=32, intermediate_size=10240, family="opt",
        extra={"word_embed_proj_dim": 2560, "do_layer_norm_before": True, "activation_function": "relu",
               "dropout": 0.1, "attention_dropout": 0.0},
    ),
    "qwen2.5-0.5b": Preset(
        hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864, family="qwen2",
        extra={"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    ),
    "qwen2.5-7b": Preset(
        hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944, family="qwen2",
        tie_word_embeddings=False,
        extra={"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    ),
    "smollm2-360m": Preset(
        hidden_size=960, num_layers=32, num_heads=15, num_kv_heads=5, intermediate_size=2560, family="llama",
        extra={"hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}},
    ),
}


def resolve(preset: str | Preset, family: str | None = None) -> tuple[Preset, str]:
    """The preset and its family: a released shape keeps its own, a generic one takes `family`."""
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    if shape.family and family and family != shape.family:
        raise ValueError(f"preset {preset!r} is a {shape.family} model, not {family}")
    family = shape.family or family or DEFAULT_FAMILY
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    if family == "opt" and shape.num_kv_heads not in (None, shape.num_heads):
        raise ValueError("OPT has no grouped-query attention")
    return shape, family


def model_config(preset: str | Preset, vocab_size: int, family: str | None = None, max_positions: int = 512,
                 **overrides) -> PreTrainedConfig:
    """The HF config of `preset` for the page vocabulary; `overrides` are config keys (e.g. dropout=0.0)."""
    shape, family = resolve(preset, family)
    config_class, _ = FAMILIES[family]
    keys = dict(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=shape.tie_word_embeddings,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    if family == "opt":
        keys["ffn_dim"] = shape.intermediate_size
    else:
        keys["intermediate_size"] = shape.intermediate_size
        keys["num_key_value_heads"] = shape.num_kv_heads or shape.num_heads
    return config_class(**{**keys, **copy.deepcopy(shape.extra), **overrides})  # HF edits dicts in place


def build_model(preset: str | Preset, vocab_size: int, family: str | None = None, max_positions: int = 512,
                **overrides) -> PreTrainedModel:
    """A randomly initialised causal LM (seed torch before calling for a reproducible init)."""
    config = model_config(preset, vocab_size, family, max_positions, **overrides)
    _, model_class = FAMILIES[resolve(preset, family)[1]]
    return model_class(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


def preset_parameters(preset: str | Preset, vocab_size: int, family: str | None = None, max_positions: int = 512) -> int:
    """Parameter count of a preset without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(build_model(preset, vocab_size, family, max_positions))


def scale_preset(preset: str | Preset, factor: float, vocab_size: int, family: str | None = None,
                 max_positions: int = 512) -> tuple[Preset, int]:
    """A shape of the same family with >= `factor` x the parameters of `preset`, and its parameter count.

    Width and depth grow in turn, whichever has grown less relative to the start, so the aspect ratio
    stays close to the original. Width grows one kv group at a time (head size fixed, the FFN keeps its
    ratio to the width), which keeps the heads divisible by the kv heads. A width step can overshoot, so
    layers are then trimmed while the target still holds.
    """
    start, family = resolve(preset, family)
    target = factor * preset_parameters(start, vocab_size, family, max_positions)
    head_dim = start.hidden_size // start.num_heads
    kv_heads = start.num_kv_heads or start.num_heads
    group = start.num_heads // kv_heads
    ffn_ratio = start.intermediate_size / start.hidden_size
    shape = dataclasses.replace(start, family=family)
    while (n := preset_parameters(shape, vocab_size, family, max_positions)) < target:
        if shape.num_layers / start.num_layers <= shape.hidden_size / start.hidden_size:
            shape = dataclasses.replace(shape, num_layers=shape.num_layers + 1)
        else:
            heads = shape.num_heads + group
            hidden = heads * head_dim
            shape = dataclasses.replace(
                shape, num_heads=heads, hidden_size=hidden, intermediate_size=round(hidden * ffn_ratio),
                num_kv_heads=None if start.num_kv_heads is None else heads // group,
                # OPT-350m projects embeddings to a smaller size; keep the projection as wide as it was.
                extra={k: (hidden if k == "word_embed_proj_dim" and v == shape.hidden_size else v)
                       for k, v in shape.extra.items()},
            )
    while shape.num_layers > 1:
        fewer = dataclasses.replace(shape, num_layers=shape.num_layers - 1)
        if (n_fewer := preset_parameters(fewer, vocab_size, family, max_positions)) < target:
            break
        shape, n = fewer, n_fewer
    return shape, n


@dataclass
class InitReport:
    loaded: list[str]
    skipped: list[str]  # "name (why)"


def init_from(model: PreTrainedModel, path: str | Path) -> InitReport:
    """Load released weights (a save_pretrained folder, safetensors) into `model`, except the token
    embeddings and the output head (their shape is the released vocabulary's) and any other tensor
    whose name or shape does not match (e.g. OPT's position table when max length differs)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    released: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name}: init_from needs safetensors weights (no pickle checkpoints)")
        released.update(load_file(path / name))

    vocab_modules = {model.get_input_embeddings(), model.get_output_embeddings()}
    vocab_names = {f"{name}.{p}" for name, module in model.named_modules() if module in vocab_modules
                   for p, _ in module.named_parameters(recurse=False)}
    own = model.state_dict()
    loaded, skipped, to_load = [], [], {}
    for name, tensor in released.items():
        # A checkpoint of the bare base model (e.g. OPTModel) lacks the "model." prefix.
        target = name if name in own else f"model.{name}"
        if target in vocab_names:
            skipped.append(f"{name} (vocabulary-sized)")
        elif target not in own:
            skipped.append(f"{name} (no such weight)")
        elif own[target].shape != tensor.shape:
            skipped.append(f"{name} (shape {tuple(tensor.shape)} != {tuple(own[target].shape)})")
        else:
            to_load[target] = tensor
            loaded.append(name)
    model.load_state_dict(to_load, strict=False)
    log.info("init_from %s: loaded %d tensors, skipped %d", path, len(loaded), len(skipped))
    return InitReport(loaded, skipped)
