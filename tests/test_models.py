"""Tests of remat.tools.models: every spec form, inputs at any batch, clear errors."""

import textwrap

import pytest
import torch
from torch import nn

import remat
from remat.tools import models, nets


def shapes(inputs):
    return [tuple(x.shape) for x in inputs]


def test_torchvision_defaults_and_options():
    source = models.load("torchvision:resnet18?num_classes=10")
    assert source.name == "torchvision:resnet18?num_classes=10"
    assert shapes(source.example_inputs) == [(32, 3, 224, 224)]
    assert source.model.fc.out_features == 10
    assert source.model.training


def test_torchvision_inception_takes_299_pixels_and_returns_one_tensor():
    source = models.load("torchvision:inception_v3", 2)
    assert shapes(source.example_inputs) == [(2, 3, 299, 299)]
    out = source.model(*source.example_inputs)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1000)


def test_input_shape_and_make_inputs():
    source = models.load("torchvision:resnet18", 3, input_shape=(3, 64, 64))
    assert shapes(source.example_inputs) == [(3, 3, 64, 64)]
    assert shapes(source.make_inputs(5)) == [(5, 3, 64, 64)]
    assert torch.equal(source.make_inputs(5)[0], source.make_inputs(5)[0])


def test_gpt2_from_config_with_overrides():
    source = models.load("hf:gpt2?n_layer=2&n_embd=64&n_head=2&seq=32&batch=3")
    config = source.model.config
    assert (config.n_layer, config.n_embd, config.n_head) == (2, 64, 2)
    assert type(source.model).__name__ == "GPT2LMHeadModel"
    (ids,) = source.example_inputs
    assert ids.shape == (3, 32) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < config.vocab_size
    logits = source.model(ids).logits
    assert logits.shape == (3, 32, config.vocab_size)


def test_gpt2_default_sequence_and_batch():
    source = models.load("hf:gpt2?n_layer=1&n_embd=64&n_head=2")
    assert shapes(source.example_inputs) == [(8, 1024)]
    assert shapes(models.load("hf:gpt2?n_layer=1", input_shape=(16,)).example_inputs) == [(8, 16)]


def test_bert_from_config():
    source = models.load("hf:bert?num_hidden_layers=1&hidden_size=64&num_attention_heads=2"
                         "&intermediate_size=128&seq=16", 2)
    assert type(source.model).__name__ == "BertModel"
    assert source.model(*source.example_inputs).last_hidden_state.shape == (2, 16, 64)


def write(tmp_path, body):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_file_factory_returning_module_and_inputs(tmp_path):
    path = write(tmp_path, """
        import torch
        def build(width=8):
            return torch.nn.Linear(width, 2), (torch.arange(3 * width).float().view(3, width),)
    """)
    source = models.load(f"{path}:build?width=4")
    assert source.model.in_features == 4
    assert shapes(source.example_inputs) == [(3, 4)]
    (bigger,) = source.make_inputs(7)
    assert bigger.shape == (7, 4)
    assert torch.equal(bigger[3:6], source.example_inputs[0])  # samples cycle
    assert shapes(models.load(f"{path}:build?width=4", 2).example_inputs) == [(2, 4)]


def test_file_factory_returning_module_needs_input_shape(tmp_path):
    path = write(tmp_path, """
        import torch
        def build():
            return torch.nn.Linear(6, 2)
    """)
    with pytest.raises(ValueError, match="input_shape"):
        models.load(f"{path}:build")
    source = models.load(f"{path}:build", 5, input_shape=(6,))
    assert source.model(*source.example_inputs).shape == (5, 2)


def test_file_factory_errors(tmp_path):
    path = write(tmp_path, """
        def build():
            return 42
    """)
    with pytest.raises(ValueError, match="has no function 'missing'"):
        models.load(f"{path}:missing")
    with pytest.raises(ValueError, match="must return an nn.Module"):
        models.load(f"{path}:build")
    with pytest.raises(ValueError, match="does not exist"):
        models.load(f"{tmp_path}/nowhere.py:build")


def test_mlp():
    source = models.load("remat:mlp?depth=2&width=32&bias=true")
    assert shapes(source.example_inputs) == [(1024, 32)]
    assert [type(m) for m in source.model] == [nn.Linear, nn.ReLU] * 2
    assert source.model[0].bias is not None
    assert models.load("remat:mlp").model[0].bias is None


def test_chain_is_deterministic_and_heterogeneous():
    spec = "remat:chain?depth=60&width=64&seed=1"
    a, b = models.load(spec), models.load(spec)
    assert len(a.model) == 60
    assert [repr(m) for m in a.model] == [repr(m) for m in b.model]
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    kinds = {type(m).__name__ for m in a.model}
    assert {"Linear", "LayerNorm", "Dropout", "Scale"} <= kinds and len(kinds) >= 6
    widths = {m.out_features for m in a.model if isinstance(m, nn.Linear)}
    assert len(widths) > 1
    other = models.load("remat:chain?depth=60&width=64&seed=2")
    assert [repr(m) for m in a.model] != [repr(m) for m in other.model]
    assert a.model(*a.make_inputs(4)).shape[0] == 4


def test_preact_resnet_1001_is_a_chain_of_blocks():
    source = models.load("remat:preact_resnet?depth=1001", 2)
    blocks = list(source.model)
    assert len(blocks) == 1 + 3 * 111 + 1  # stem conv, 3 stages of n = (1001 - 2) / 9, head
    assert sum(isinstance(b, nets.PreActBottleneck) for b in blocks) == 333
    assert shapes(source.example_inputs) == [(2, 3, 32, 32)]


def test_preact_resnet_runs():
    source = models.load("remat:preact_resnet?depth=11&num_classes=7", 2)
    assert source.model(*source.example_inputs).shape == (2, 7)


def test_random_dag_uses_every_op():
    source = models.load("remat:random_dag?ops=30&width=16&seed=5", 4)
    model = source.model
    ops = {op for op, _ in model.program}
    assert {"linear", "add", "mul", "cat", "split"} <= ops
    model(*source.example_inputs).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_load_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.load("remat:chain?depth=4")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet50", "has no scheme"),
        ("tv:resnet50", "unknown model source 'tv'"),
        ("torchvision:resnet5", "no classification model 'resnet5'"),
        ("torchvision:resnet18?wings=2", "bad option for torchvision:resnet18"),
        ("hf:lama", "no Hugging Face model type 'lama'"),
        ("hf:gpt2?n_lyr=2", "GPT2Config has no field 'n_lyr'"),
        ("remat:tree", "use one of: remat:chain"),
        ("remat:chain?dpth=3", "no option dpth; its options are batch, depth, width, seed"),
        ("remat:preact_resnet?depth=100", "9n\\+2"),
        ("remat:mlp?depth", "not key=value"),
        ("remat:mlp?batch=0", "positive integer"),
    ],
)
def test_bad_specs_are_explained(spec, message):
    with pytest.raises(ValueError, match=message):
        models.load(spec)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        models.load("remat:mlp", 0)


def test_hf_input_shape_must_be_a_length():
    with pytest.raises(ValueError, match="sequence length"):
        models.load("hf:gpt2", input_shape=(3, 224, 224))


SMALL_LM = "hidden_size=64&num_hidden_layers=2&num_attention_heads=4&intermediate_size=128&vocab_size=256"


@pytest.mark.parametrize(
    "spec",
    [
        f"hf:llama?{SMALL_LM}&num_key_value_heads=2",
        # T5 shares its embedding between encoder, decoder and lm_head: the last part of its
        # gradient, added out of place, makes this tiny model's peak.
        "hf:t5?d_model=64&d_ff=128&num_layers=2&num_heads=4&d_kv=16&vocab_size=256&decoder_start_token_id=0"
        "&pad_token_id=0",
    ],
    ids=["llama", "t5"],
)
def test_any_transformers_type_builds_with_a_batch_that_trains_and_plans_exactly(spec):
    source = models.load(spec, 2, input_shape=(16,))
    batch = source.example_inputs
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "use_cache"] and batch["use_cache"] is False
    assert source.model(**batch).loss.dim() == 0
    fast = remat.optimize(source.model, batch)
    assert remat.measure_step(fast, batch).peak_bytes == fast.plan.predicted_peak_bytes


def test_an_image_model_type_gets_pixels_and_labels():
    spec = "hf:vit?hidden_size=32&num_hidden_layers=1&num_attention_heads=2&intermediate_size=64&image_size=32&patch_size=8"
    source = models.load(spec, 3)
    assert tuple(source.example_inputs["pixel_values"].shape) == (3, 3, 32, 32)
    assert source.model(**source.example_inputs).loss.dim() == 0


def test_transformers_types_refuse_unknown_fields_tasks_and_models_too_big_to_build():
    with pytest.raises(ValueError, match="no field 'hiden_size'"):
        models.load("hf:llama?hiden_size=64")
    with pytest.raises(ValueError, match="no task 'masked-lm'"):
        models.load(f"hf:llama?{SMALL_LM}&task=masked-lm")
    with pytest.raises(ValueError, match="billion parameters"):
        models.load("hf:llama")  # the config's defaults: a 7B model


@pytest.mark.parametrize(
    "spec", ["torchvision:resnet18", f"hf:llama?{SMALL_LM}&num_key_value_heads=2&dtype=bfloat16", "remat:mlp?depth=3"]
)
def test_a_spec_built_without_weights_plans_as_the_one_with_weights(spec):
    from torch._subclasses.fake_tensor import FakeTensor

    real, fake = models.load(spec, 2, input_shape=None), models.load(spec, 2, fake=True)
    assert all(isinstance(t, FakeTensor) for t in [*fake.model.parameters(), *fake.model.buffers()])
    assert [p.dtype for p in fake.model.parameters()] == [p.dtype for p in real.model.parameters()]
    expected, planned = remat.plan(real.model, real.example_inputs), remat.plan(fake.model, fake.example_inputs)
    assert (planned.checkpoints, planned.predicted_peak_bytes, planned.fingerprint) == (
        expected.checkpoints, expected.predicted_peak_bytes, expected.fingerprint
    )


def test_a_model_too_big_to_build_builds_without_weights():
    source = models.load("hf:llama?seq=32", 1, fake=True)  # the config's defaults: a 7B model
    assert sum(p.numel() for p in source.model.parameters()) > 6e9
    with pytest.raises(ValueError, match="dtype='int8'.*not a floating-point"):
        models.load("remat:mlp?dtype=int8")
