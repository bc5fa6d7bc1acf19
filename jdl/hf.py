"""Hugging Face `transformers` checkpoints loaded into jdl's own models.

Three architectures are understood, each mapped tensor by tensor onto a jdl model:

| `config.json` architecture      | jdl model         | notes                          |
|---------------------------------|-------------------|--------------------------------|
| `ResNetForImageClassification`  | `models.ResNet`   | ImageNet stem, v1.5 blocks     |
| `ViTForImageClassification`     | `models.ViT`      | erf GELU, LayerNorm eps 1e-12  |
| `GPT2LMHeadModel`, `GPT2Model`  | `models.GPT`      | tanh GELU, tied or untied head |

A checkpoint is a directory holding `config.json` and the weights as safetensors
(`model.safetensors`, or shards listed in `model.safetensors.index.json`) or as a PyTorch
state dict (`pytorch_model.bin`, which needs torch). Both the current `transformers`
parameter names and the older ones of checkpoints on the Hub are read.

Layouts differ between PyTorch and jdl and are converted here: conv kernels
`(O, I, kh, kw) -> (kh, kw, I, O)`, dense kernels `(out, in) -> (in, out)`, ViT's
separate q/k/v projections -> one fused `(C, 3C)` kernel, ViT's patch conv -> a dense
layer on flattened `(row, column, channel)` patches. Images are NHWC in jdl and NCHW in
`transformers`: transpose inputs with `x.transpose(0, 2, 3, 1)`.

Every tensor of the checkpoint must find a place in the model and every variable of the
model must be filled, so a checkpoint that jdl cannot express fails loudly instead of
loading half its weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdl.errors import UserError
from jdl.models.resnet import BasicBlock, Bottleneck, ResNet
from jdl.models.transformer import GPT
from jdl.models.vit import ViT

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "CheckpointFormatError",
    "PretrainedUnavailableError",
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX",
    "TORCH_FILE",
    "TORCH_INDEX",
    "gpt2_from_hf",
    "load_pretrained",
    "model_from_hf",
    "read_checkpoint",
    "resnet_from_hf",
    "vit_from_hf",
]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

# transformers' activation names -> jdl's (jdl's "gelu" is the tanh approximation).
ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu_exact",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_fast": "gelu",
    "silu": "silu",
    "swish": "silu",
}


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint's config or tensors do not fit the jdl model it maps onto."""


class PretrainedUnavailableError(UserError, FileNotFoundError):
    """A pretrained checkpoint is neither a local directory nor downloadable now."""


# ---------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------


def read_checkpoint(directory: str | os.PathLike[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads `config.json` and all weight tensors of a local checkpoint directory.

    Returns:
      `(config, tensors)`: the parsed config dict and a dict name -> float32 numpy array
      (integer buffers such as `num_batches_tracked` keep their dtype).

    Raises:
      PretrainedUnavailableError: the directory, its config or its weights are missing.
    """
    directory = Path(directory).expanduser()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise PretrainedUnavailableError(f"no config.json in checkpoint directory {directory}")
    config = json.loads(config_path.read_text())
    files = _weight_files(directory)
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(_read_tensors(path))
    return config, tensors


def _weight_files(directory: Path) -> list[Path]:
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (TORCH_FILE, TORCH_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            shards = json.loads((directory / index).read_text())["weight_map"].values()
            return [directory / name for name in sorted(set(shards))]
    raise PretrainedUnavailableError(
        f"no weights in {directory}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
        f"{TORCH_FILE} or {TORCH_INDEX}"
    )


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.flax import load_file  # reads bfloat16 too, unlike plain numpy

        return {name: _to_numpy(value) for name, value in load_file(str(path)).items()}
    try:
        import torch
    except ImportError as error:
        raise CheckpointFormatError(
            f"{path.name} is a PyTorch file and needs torch installed; "
            "convert it to safetensors or install torch"
        ) from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        name: _to_numpy(value.float() if value.is_floating_point() else value)
        for name, value in state.items()
    }


def _to_numpy(value) -> np.ndarray:
    array = np.asarray(value)
    return (
        array.astype(np.float32)
        if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"
        else array
    )


# ---------------------------------------------------------------------------------------------
# Filling a model, tensor by tensor
# ---------------------------------------------------------------------------------------------


class _Tensors:
    """The checkpoint's tensors, handed out by name; remembers which were used."""

    def __init__(self, tensors: Mapping[str, np.ndarray], ignore: Callable[[str], bool]):
        self.tensors = {name: value for name, value in tensors.items() if not ignore(name)}
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise CheckpointFormatError(f"the checkpoint has no tensor {name!r}")
        self.used.add(name)
        return self.tensors[name]

    def check_all_used(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
            raise CheckpointFormatError(
                f"{len(unused)} checkpoint tensors have no place in the jdl model: {shown}"
            )


def _set(variable: nnx.Variable, value: np.ndarray, name: str) -> None:
    expected = tuple(variable.value.shape)
    if tuple(value.shape) != expected:
        raise CheckpointFormatError(
            f"tensor {name!r} has shape {tuple(value.shape)}, the jdl model expects {expected}"
        )
    variable.value = jnp.asarray(value, variable.value.dtype)


def _conv(tensors: _Tensors, prefix: str, conv: nnx.Conv) -> None:
    name = f"{prefix}.weight"
    _set(conv.kernel, tensors.take(name).transpose(2, 3, 1, 0), name)  # OIHW -> HWIO


def _batch_norm(tensors: _Tensors, prefix: str, bn: nnx.BatchNorm) -> None:
    pairs = (
        ("weight", bn.scale),
        ("bias", bn.bias),
        ("running_mean", bn.mean),
        ("running_var", bn.var),
    )
    for suffix, variable in pairs:
        _set(variable, tensors.take(f"{prefix}.{suffix}"), f"{prefix}.{suffix}")


def _dense(tensors: _Tensors, prefix: str, dense: nnx.Linear, *, transpose: bool = True) -> None:
    """A PyTorch Linear `(out, in)` (transpose) or a GPT-2 Conv1D `(in, out)` (no transpose)."""
    kernel = tensors.take(f"{prefix}.weight")
    _set(dense.kernel, kernel.T if transpose else kernel, f"{prefix}.weight")
    if dense.bias is not None:
        _set(dense.bias, tensors.take(f"{prefix}.bias"), f"{prefix}.bias")


def _layer_norm(tensors: _Tensors, prefix: str, norm: nnx.LayerNorm) -> None:
    _set(norm.scale, tensors.take(f"{prefix}.weight"), f"{prefix}.weight")
    _set(norm.bias, tensors.take(f"{prefix}.bias"), f"{prefix}.bias")


def _check_all_filled(model: nnx.Module) -> None:
    """Raises unless every variable of `model` (built abstractly) received a real array."""
    missing = [
        ".".join(map(str, path))
        for path, value in nnx.to_flat_state(nnx.state(model))
        if isinstance(getattr(value, "value", value), jax.ShapeDtypeStruct)
    ]
    if missing:
        raise CheckpointFormatError(f"the checkpoint left jdl variables unset: {missing[:5]}")


def _abstract(build: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    # Shapes only: the checkpoint provides every value, so no random init is computed.
    return nnx.eval_shape(lambda: build(nnx.Rngs(0)))


def _config_value(config: Mapping, key: str, default=None):
    value = config.get(key, default)
    if value is None:
        raise CheckpointFormatError(f"config.json has no {key!r}")
    return value


def _activation(config: Mapping, key: str, default: str) -> str:
    name = config.get(key, default)
    if name not in ACTIVATIONS:
        raise CheckpointFormatError(
            f"activation {name!r} ({key}) is not supported; known: {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckpointFormatError(message)


# ---------------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------------


def resnet_from_hf(config: Mapping, tensors: Mapping[str, np.ndarray]) -> ResNet:
    """A `ResNet` holding the weights of a `ResNetForImageClassification` checkpoint.

    Supports the Hub's ResNets (microsoft/resnet-*): 7x7/2 stem with max pool, stages of
    basic or bottleneck (stride on the 3x3 conv, "v1.5") blocks, projection shortcuts,
    ReLU. `downsample_in_first_stage` and `downsample_in_bottleneck` (v1) are rejected.
    """
    _require(
        not config.get("downsample_in_first_stage", False),
        "downsample_in_first_stage=True is not supported",
    )
    _require(
        not config.get("downsample_in_bottleneck", False),
        "downsample_in_bottleneck=True (ResNet v1) is not supported",
    )
    _require(_activation(config, "hidden_act", "relu") == "relu", "only ReLU ResNets are supported")
    block = BasicBlock if config.get("layer_type", "bottleneck") == "basic" else Bottleneck
    hidden_sizes = list(_config_value(config, "hidden_sizes"))
    _require(
        all(size % block.expansion == 0 for size in hidden_sizes),
        f"hidden_sizes {hidden_sizes} must be multiples of the bottleneck expansion 4",
    )
    weights = _Tensors(tensors, ignore=lambda name: name.endswith("num_batches_tracked"))
    num_classes = weights.take("classifier.1.weight").shape[0]

    def build(rngs: nnx.Rngs) -> ResNet:
        return ResNet(
            list(_config_value(config, "depths")),
            block,
            num_classes,
            width=config.get("embedding_size", 64),
            stage_widths=[size // block.expansion for size in hidden_sizes],
            stem="imagenet",
            in_channels=config.get("num_channels", 3),
            shortcut="projection",
            rngs=rngs,
        )

    model = _abstract(build)
    stem = "resnet.embedder.embedder"
    _conv(weights, f"{stem}.convolution", model.stem_conv)
    _batch_norm(weights, f"{stem}.normalization", model.stem_bn)
    for i, stage in enumerate(model.stages):
        for j, block_module in enumerate(stage):
            prefix = f"resnet.encoder.stages.{i}.layers.{j}"
            if block_module.projection is not None:
                _conv(weights, f"{prefix}.shortcut.convolution", block_module.projection.conv)
                _batch_norm(weights, f"{prefix}.shortcut.normalization", block_module.projection.bn)
            convs = [
                getattr(block_module, f"conv{k}")
                for k in (1, 2, 3)
                if hasattr(block_module, f"conv{k}")
            ]
            for k, conv_module in enumerate(convs):
                _conv(weights, f"{prefix}.layer.{k}.convolution", conv_module)
                _batch_norm(
                    weights,
                    f"{prefix}.layer.{k}.normalization",
                    getattr(block_module, f"bn{k + 1}"),
                )
    _dense(weights, "classifier.1", model.head)
    weights.check_all_used()
    _check_all_filled(model)
    return model


# ---------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------

# Names of checkpoints written before transformers 5 -> the current names.
_VIT_RENAMES = (
    (
        r"vit\.encoder\.layer\.(\d+)\.attention\.attention\.query\.",
        r"vit.layers.\1.attention.q_proj.",
    ),
    (
        r"vit\.encoder\.layer\.(\d+)\.attention\.attention\.key\.",
        r"vit.layers.\1.attention.k_proj.",
    ),
    (
        r"vit\.encoder\.layer\.(\d+)\.attention\.attention\.value\.",
        r"vit.layers.\1.attention.v_proj.",
    ),
    (r"vit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"vit.layers.\1.attention.o_proj."),
    (r"vit\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"vit.layers.\1.mlp.fc1."),
    (r"vit\.encoder\.layer\.(\d+)\.output\.dense\.", r"vit.layers.\1.mlp.fc2."),
    (r"vit\.encoder\.layer\.(\d+)\.layernorm_", r"vit.layers.\1.layernorm_"),
)


def _rename(tensors: Mapping[str, np.ndarray], renames) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        for pattern, replacement in renames:
            name = re.sub("^" + pattern, replacement, name)
        out[name] = value
    return out


def vit_from_hf(config: Mapping, tensors: Mapping[str, np.ndarray]) -> ViT:
    """A `ViT` holding the weights of a `ViTForImageClassification` checkpoint.

    The pooler of `ViTModel` checkpoints is unused by the classifier and ignored. Without
    `qkv_bias`, the q/k/v biases are zeros, which is the same function.
    """
    embed_dim = _config_value(config, "hidden_size", 768)
    hidden = config.get("intermediate_size", 3072)
    _require(
        hidden % embed_dim == 0,
        f"intermediate_size {hidden} must be a multiple of hidden_size {embed_dim}",
    )
    weights = _Tensors(
        _rename(tensors, _VIT_RENAMES), ignore=lambda name: name.startswith("vit.pooler.")
    )
    num_classes = weights.take("classifier.weight").shape[0]
    patch_size = config.get("patch_size", 16)

    def build(rngs: nnx.Rngs) -> ViT:
        return ViT(
            config.get("image_size", 224),
            patch_size,
            config.get("num_channels", 3),
            num_classes,
            embed_dim,
            config.get("num_attention_heads", 12),
            config.get("num_hidden_layers", 12),
            mlp_ratio=hidden // embed_dim,
            activation=_activation(config, "hidden_act", "gelu"),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            rngs=rngs,
        )

    model = _abstract(build)
    _set(model.cls_token, weights.take("vit.embeddings.cls_token"), "cls_token")
    _set(
        model.position_embed,
        weights.take("vit.embeddings.position_embeddings"),
        "position_embeddings",
    )
    projection = "vit.embeddings.patch_embeddings.projection"
    conv_kernel = weights.take(f"{projection}.weight")  # (C_out, C_in, P, P)
    # (P, P, C_in, C_out) flattened like `patchify`'s (row, column, channel) patches.
    _set(
        model.patch_embed.kernel,
        conv_kernel.transpose(2, 3, 1, 0).reshape(-1, embed_dim),
        projection,
    )
    _set(model.patch_embed.bias, weights.take(f"{projection}.bias"), f"{projection}.bias")
    for i, block in enumerate(model.blocks):
        prefix = f"vit.layers.{i}"
        _layer_norm(weights, f"{prefix}.layernorm_before", block.ln1)
        _layer_norm(weights, f"{prefix}.layernorm_after", block.ln2)
        _fused_qkv(weights, f"{prefix}.attention", block.attn.qkv, embed_dim)
        _dense(weights, f"{prefix}.attention.o_proj", block.attn.out)
        _dense(weights, f"{prefix}.mlp.fc1", block.mlp.fc1)
        _dense(weights, f"{prefix}.mlp.fc2", block.mlp.fc2)
    _layer_norm(weights, "vit.layernorm", model.ln_f)
    _dense(weights, "classifier", model.head)
    weights.check_all_used()
    _check_all_filled(model)
    return model


def _fused_qkv(weights: _Tensors, prefix: str, qkv: nnx.Linear, embed_dim: int) -> None:
    """Separate (out, in) q/k/v projections -> jdl's (C, 3C) kernel with columns [q | k | v]."""
    names = [f"{prefix}.{part}_proj" for part in "qkv"]
    kernel = np.concatenate([weights.take(f"{name}.weight").T for name in names], axis=1)
    biases = [
        weights.take(f"{name}.bias")
        if f"{name}.bias" in weights
        else np.zeros(embed_dim, np.float32)
        for name in names
    ]
    _set(qkv.kernel, kernel, f"{prefix}.qkv")
    _set(qkv.bias, np.concatenate(biases), f"{prefix}.qkv bias")


# ---------------------------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------------------------


def _is_gpt2_buffer(name: str) -> bool:
    # Causal-mask buffers stored by old checkpoints, not weights.
    return name.endswith((".attn.bias", ".attn.masked_bias"))


def gpt2_from_hf(config: Mapping, tensors: Mapping[str, np.ndarray]) -> GPT:
    """A `GPT` holding the weights of a `GPT2LMHeadModel` (or `GPT2Model`) checkpoint.

    GPT-2's Conv1D layers store kernels as (in, out), jdl's layout, and its fused
    `c_attn` has jdl's [q | k | v] columns, so they load without transposes. A tied LM
    head (the default) reuses the token embedding; an untied one becomes `model.head`.
    """
    _require(config.get("scale_attn_weights", True), "scale_attn_weights=False is not supported")
    _require(
        not config.get("scale_attn_by_inverse_layer_idx", False),
        "scale_attn_by_inverse_layer_idx=True is not supported",
    )
    embed_dim = _config_value(config, "n_embd", 768)
    inner = config.get("n_inner") or 4 * embed_dim
    _require(inner % embed_dim == 0, f"n_inner {inner} must be a multiple of n_embd {embed_dim}")
    tied = config.get("tie_word_embeddings", True)
    renamed = {name.removeprefix("transformer."): value for name, value in tensors.items()}
    if tied:
        renamed.pop("lm_head.weight", None)  # a copy of wte
    weights = _Tensors(renamed, ignore=_is_gpt2_buffer)

    def build(rngs: nnx.Rngs) -> GPT:
        return GPT(
            config.get("vocab_size", 50257),
            config.get("n_positions", 1024),
            embed_dim,
            config.get("n_head", 12),
            config.get("n_layer", 12),
            tie_embeddings=tied,
            mlp_ratio=inner // embed_dim,
            activation=_activation(config, "activation_function", "gelu_new"),
            layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
            rngs=rngs,
        )

    model = _abstract(build)
    _set(model.token_embed.embedding, weights.take("wte.weight"), "wte.weight")
    _set(model.position_embed.embedding, weights.take("wpe.weight"), "wpe.weight")
    for i, block in enumerate(model.blocks):
        prefix = f"h.{i}"
        _layer_norm(weights, f"{prefix}.ln_1", block.ln1)
        _layer_norm(weights, f"{prefix}.ln_2", block.ln2)
        _dense(weights, f"{prefix}.attn.c_attn", block.attn.qkv, transpose=False)
        _dense(weights, f"{prefix}.attn.c_proj", block.attn.out, transpose=False)
        _dense(weights, f"{prefix}.mlp.c_fc", block.mlp.fc1, transpose=False)
        _dense(weights, f"{prefix}.mlp.c_proj", block.mlp.fc2, transpose=False)
    _layer_norm(weights, "ln_f", model.ln_f)
    if not tied:
        _dense(weights, "lm_head", model.head)
    weights.check_all_used()
    _check_all_filled(model)
    return model


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

ARCHITECTURES: dict[str, Callable[[Mapping, Mapping[str, np.ndarray]], nnx.Module]] = {
    "ResNetForImageClassification": resnet_from_hf,
    "ViTForImageClassification": vit_from_hf,
    "GPT2LMHeadModel": gpt2_from_hf,
}
_MODEL_TYPES = {"resnet": resnet_from_hf, "vit": vit_from_hf, "gpt2": gpt2_from_hf}


def model_from_hf(config: Mapping, tensors: Mapping[str, np.ndarray]) -> nnx.Module:
    """The jdl model for a parsed `config.json` and its tensors (see `ARCHITECTURES`)."""
    for architecture in config.get("architectures") or ():
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture](config, tensors)
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type](config, tensors)
    raise CheckpointFormatError(
        f"unsupported checkpoint (architectures {config.get('architectures')}, model_type "
        f"{model_type!r}); supported: {sorted(ARCHITECTURES)}"
    )


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    with_tokenizer: bool = False,
) -> nnx.Module | tuple[nnx.Module, Any]:
    """A jdl model with the weights of a Hugging Face checkpoint, in eval mode.

    Args:
      name_or_path: a local directory with `config.json` and weights (works offline), or
        a Hub repository id such as "microsoft/resnet-18", downloaded with
        `huggingface_hub` (and cached by it).
      revision: the Hub branch, tag or commit (ignored for local directories).
      with_tokenizer: also load the checkpoint's byte-level BPE tokenizer
        (`jdl.data.tokenizer.load_tokenizer`: `tokenizer.json`, or `vocab.json` +
        `merges.txt`).

    Returns:
      The model; with `with_tokenizer`, the pair `(model, tokenizer)`, where the
        tokenizer is None when the checkpoint has no tokenizer files.

    Raises:
      PretrainedUnavailableError: a local path that does not exist, or a Hub id that
        cannot be downloaded now (offline, `HF_HUB_OFFLINE=1`, unknown repository).
      CheckpointFormatError: the checkpoint does not map onto a jdl model.
      jdl.data.tokenizer.TokenizerFormatError: tokenizer files that cannot be read.
    """
    directory = Path(name_or_path).expanduser()
    if not directory.is_dir():
        if _looks_like_path(str(name_or_path)):
            raise PretrainedUnavailableError(f"checkpoint directory {directory} does not exist")
        directory = _download(str(name_or_path), revision)
    model = model_from_hf(*read_checkpoint(directory))
    model.eval()
    if not with_tokenizer:
        return model
    from jdl.data import tokenizer as tokenizer_files  # the `tokenizers` library, on demand

    if tokenizer_files.has_tokenizer(directory):
        return model, tokenizer_files.load_tokenizer(directory)
    if directory != Path(name_or_path).expanduser():  # from the Hub: its tokenizer files too
        try:
            return model, tokenizer_files.load_tokenizer(str(name_or_path), revision=revision)
        except tokenizer_files.TokenizerNotFoundError:
            pass
    return model, None


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _download(repo_id: str, revision: str | None) -> Path:
    """Downloads config and weights (safetensors if the repository has them) from the Hub."""
    try:
        import huggingface_hub

        patterns = ["config.json", SAFETENSORS_FILE, SAFETENSORS_INDEX, "model-*.safetensors"]
        directory = Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        )
        if not any(directory.glob("*.safetensors")):
            patterns = ["config.json", TORCH_FILE, TORCH_INDEX, "pytorch_model-*.bin"]
            directory = Path(
                huggingface_hub.snapshot_download(
                    repo_id, revision=revision, allow_patterns=patterns
                )
            )
    except Exception as error:  # offline, unknown repo, network: one message for people
        raise PretrainedUnavailableError(
            f"cannot download {repo_id!r} from the Hugging Face Hub ({type(error).__name__}); "
            "go online or pass a local directory that holds config.json and the weights"
        ) from error
    return directory
