"""Hugging Face checkpoints in jdl models: logits equal `transformers`' own, loading errors clear.

References are randomly initialised `transformers` models with tiny configs (torch CPU,
fp32, eval mode), saved with `save_pretrained` and read back by `jdl.hf`; batch-norm
running statistics are randomised so that a wrong mapping of them would show.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jdl import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def randomize_batch_norm(model) -> None:
    """Random running statistics and affine parameters, so eval-mode BN is not the identity."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(shape, generator=generator))
            module.bias.data.copy_(torch.rand(shape, generator=generator) - 0.5)


def resnet(layer_type, hidden_sizes, depths):
    config = transformers.ResNetConfig(
        embedding_size=8,
        hidden_sizes=hidden_sizes,
        depths=depths,
        layer_type=layer_type,
        num_labels=5,
    )
    model = transformers.ResNetForImageClassification(config)
    with torch.no_grad():
        randomize_batch_norm(model)
    return model


def vit(**overrides):
    config = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(transformers.ViTConfig(**{**config, **overrides}))


def gpt2(**overrides):
    config = dict(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=61,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config, **overrides}))


def images(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    return x, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))  # NCHW for torch, NHWC for jdl


def tokens(vocab_size):
    t = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    return t, jnp.asarray(t.numpy())


CASES = {
    "resnet_basic": (lambda: resnet("basic", [8, 16], [2, 1]), lambda: images((2, 3, 32, 32))),
    "resnet_bottleneck": (
        lambda: resnet("bottleneck", [16, 32, 64], [1, 2, 1]),
        lambda: images((2, 3, 32, 32)),
    ),
    "vit_small": (vit, lambda: images((2, 3, 16, 16))),
    "vit_wider_gray_no_qkv_bias": (
        lambda: vit(
            hidden_size=48,
            num_attention_heads=4,
            num_hidden_layers=3,
            intermediate_size=96,
            num_channels=1,
            image_size=24,
            patch_size=8,
            qkv_bias=False,
        ),
        lambda: images((2, 1, 24, 24)),
    ),
    "gpt2_tied": (gpt2, lambda: tokens(61)),
    "gpt2_untied_deeper": (
        lambda: gpt2(n_embd=48, n_layer=3, n_head=4, tie_word_embeddings=False),
        lambda: tokens(61),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    make_reference, make_inputs = CASES[case]
    torch.manual_seed(0)
    reference = make_reference().eval()
    reference.save_pretrained(tmp_path)
    torch_inputs, jax_inputs = make_inputs()
    with torch.no_grad():
        want = reference(torch_inputs).logits.numpy()

    model = hf.load_pretrained(tmp_path)
    got = np.asarray(model(jax_inputs))

    assert got.shape == want.shape
    assert np.abs(want).max() > 0.05  # a real signal, not all zeros
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_pytorch_state_dict_and_old_parameter_names(tmp_path):
    """A `pytorch_model.bin` with the pre-transformers-5 ViT names loads to the same logits."""
    torch.manual_seed(0)
    reference = vit().eval()
    old_names = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    state = {}
    for name, value in reference.state_dict().items():
        name = name.replace("vit.layers.", "vit.encoder.layer.")
        for new, old in old_names.items():
            name = name.replace(new, old)
        state[name] = value
    state["vit.pooler.dense.weight"] = torch.zeros(32, 32)  # ViTModel's pooler: ignored
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(reference.config.to_json_string())
    x_torch, x_jax = images((2, 3, 16, 16))
    with torch.no_grad():
        want = reference(x_torch).logits.numpy()
    np.testing.assert_allclose(
        np.asarray(hf.load_pretrained(tmp_path)(x_jax)), want, atol=TOLERANCE, rtol=0
    )


def test_checkpoint_errors_name_the_problem(tmp_path):
    reference = gpt2()
    reference.save_pretrained(tmp_path)
    config, tensors = hf.read_checkpoint(tmp_path)

    extra = {**tensors, "transformer.h.0.attn.rotary.weight": np.zeros(3, np.float32)}
    with pytest.raises(hf.CheckpointFormatError, match="no place in the jdl model"):
        hf.model_from_hf(config, extra)
    missing = {k: v for k, v in tensors.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(hf.CheckpointFormatError, match="ln_f.bias"):
        hf.model_from_hf(config, missing)
    with pytest.raises(hf.CheckpointFormatError, match="unsupported checkpoint"):
        hf.model_from_hf({"architectures": ["BertModel"], "model_type": "bert"}, tensors)
    with pytest.raises(hf.CheckpointFormatError, match="scale_attn_by_inverse_layer_idx"):
        hf.model_from_hf({**config, "scale_attn_by_inverse_layer_idx": True}, tensors)

    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 40, "n_head": 2}))
    with pytest.raises(hf.CheckpointFormatError, match="has shape"):
        hf.load_pretrained(tmp_path)


def test_missing_local_directory_is_reported(tmp_path):
    with pytest.raises(hf.PretrainedUnavailableError, match="does not exist"):
        hf.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(hf.PretrainedUnavailableError, match="no weights"):
        hf.load_pretrained(tmp_path)


def _isolate_hub(monkeypatch, tmp_path):
    """An empty Hub cache and an endpoint nobody listens on: no test ever reaches the Hub."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return constants


@pytest.mark.parametrize("offline_flag", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_hub_name_offline_fails_with_one_clear_sentence(monkeypatch, tmp_path, offline_flag):
    constants = _isolate_hub(monkeypatch, tmp_path)
    if offline_flag:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hf.PretrainedUnavailableError) as caught:
        hf.load_pretrained("microsoft/resnet-18")
    message = str(caught.value)
    assert "cannot download 'microsoft/resnet-18'" in message
    assert "local directory" in message and "\n" not in message
