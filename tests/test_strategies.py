"""Peer strategies of the benchmarks: per-block torch.utils.checkpoint on a copy of the model."""

import pytest
import torch
from grad_helpers import assert_grads_equal, step_grads

from remat import measure_step
from remat.tools import models
from remat.tools.strategies import checkpoint_blocks


@pytest.mark.parametrize(
    "spec, shape, blocks",
    [
        ("torchvision:resnet18", (3, 32, 32), "BasicBlock"),
        ("torchvision:densenet121", (3, 32, 32), "_DenseLayer"),  # its layers read a list the block appends to
        ("torchvision:swin_t", (3, 64, 64), "SwinTransformerBlock"),  # blocks inside repeated stages
    ],
)
def test_checkpointed_blocks_give_the_models_gradients_with_fewer_activations(spec, shape, blocks):
    torch.manual_seed(0)
    source = models.load(spec, 2, input_shape=shape)
    model, x = source.model, source.example_inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointed = checkpoint_blocks(model)
    assert any(type(m).__name__ == blocks and "checkpoint" in repr(m.forward) for m in checkpointed.modules())
    assert not any("checkpoint" in repr(m.forward) for m in model.modules())  # the model is left as it is
    assert_grads_equal(step_grads(model, x), step_grads(checkpointed, x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k)
    plain, fewer = measure_step(model, x, fake=True), measure_step(checkpointed, x, fake=True)
    assert fewer.activation_peak_bytes < plain.activation_peak_bytes
    assert fewer.backward_flops > plain.backward_flops


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(ValueError, match="no repeated blocks"):
        checkpoint_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))


def test_a_sequential_of_blocks_checkpoints_each_block():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh()) for _ in range(4)])
    x = torch.randn(64, 32)
    checkpointed = checkpoint_blocks(net)
    assert sum("checkpoint" in repr(m.forward) for m in checkpointed.modules()) == 4
    assert_grads_equal(step_grads(net, (x,)), step_grads(checkpointed, (x,)))


def test_selective_blocks_keep_matmul_and_convolution_outputs_and_recompute_the_rest():
    """The selective peer: exact gradients, a lower activation peak than storing everything, and
    no convolution run again (its policy saves their outputs); plain per-block checkpointing
    reruns them and goes lower."""
    torch.manual_seed(0)
    source = models.load("torchvision:resnet18", 2, input_shape=(3, 32, 32))
    model, x = source.model, source.example_inputs
    selective = checkpoint_blocks(model, selective=True)
    assert_grads_equal(step_grads(model, x), step_grads(selective, x))
    plain, kept, blocks = (measure_step(m, x, fake=True) for m in (model, selective, checkpoint_blocks(model)))
    assert blocks.activation_peak_bytes < kept.activation_peak_bytes < plain.activation_peak_bytes
    assert kept.backward_flops == plain.backward_flops < blocks.backward_flops
