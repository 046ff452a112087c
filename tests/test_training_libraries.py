"""Where people train: Hugging Face's Trainer (with PEFT's LoRA too), accelerate, and the examples."""

import inspect
import sys
from pathlib import Path

import pytest
import torch

import remat

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _gpt2(lora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    if lora:  # adapters with dropout: the recomputation must draw the same masks
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", lora_dropout=0.1)
        )
    return model.train()


def _blocks(count: int = 12, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (count, seq), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row.roll(1)} for row in ids]


def _trained(model: torch.nn.Module, trained: torch.nn.Module, data: list, tmp_path: Path) -> list[float]:
    """Losses of 3 Trainer steps of ``trained`` (``model`` or remat's module of it)."""
    # remat's module takes no loss keyword arguments (num_items_in_batch: the batch a plan was made
    # for has none), so the Trainer averages the loss per batch; the model is told to do the same.
    inner = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    inner.accepts_loss_kwargs = False
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, learning_rate=1e-2,
    )
    trainer = transformers.Trainer(model=trained, args=args, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_trainer_trains_the_optimized_module_as_the_model(lora, tmp_path):
    data = _blocks()
    model = _gpt2(lora)
    expected = _trained(model, model, data, tmp_path)

    model = _gpt2(lora)
    batch = transformers.default_data_collator(data[:4])
    fast = remat.optimize(model, batch, budget=int(0.9 * remat.plan(model, batch, budget=None).baseline_peak_bytes))
    assert fast.plan.checkpoints
    # The Trainer keeps the batch columns the forward names, and finds the labels in it.
    assert inspect.signature(fast.forward).parameters.keys() == inspect.signature(model.forward).parameters.keys()
    assert "labels" in transformers.utils.generic.find_labels(type(fast))
    losses = _trained(model, fast, data, tmp_path)
    assert losses == expected and len(losses) == 3  # dropout in the model and adapters: same masks
    reference = _gpt2(lora)
    _trained(reference, reference, data, tmp_path)
    for (name, value), expected_value in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected_value), name


def test_an_accelerate_loop_trains_the_optimized_module_as_the_model():
    data = _blocks(8)
    batches = [transformers.default_data_collator(data[i : i + 4]) for i in range(0, 8, 4)]

    def train(model, module):
        accelerator = accelerate.Accelerator(cpu=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        module, optimizer = accelerator.prepare(module, optimizer)
        torch.manual_seed(2)
        losses = []
        for batch in batches:
            loss = module(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    model = _gpt2()
    expected = train(model, model)
    model = _gpt2()
    assert train(model, remat.optimize(model, batches[0])) == expected


def _run_example(name: str, argv: list[str], monkeypatch) -> list[float]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [name])
    module = __import__(name)
    return module.main(argv)


def test_the_hugging_face_example_fine_tunes_at_a_tiny_size(tmp_path, monkeypatch):
    tiny = ["--layers", "2", "--hidden", "64", "--vocab", "256", "--seq", "32", "--batch", "2", "--steps", "3"]
    losses = _run_example("hf_finetune", [*tiny, "--lora", "--out", str(tmp_path)], monkeypatch)
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert (tmp_path / "adapter_model.safetensors").exists()  # the adapters it trained, saved


def test_the_torchvision_example_trains_at_a_tiny_size(monkeypatch):
    argv = ["--model", "resnet18", "--batch", "8", "--size", "64", "--classes", "10", "--steps", "3", "--budget", "95MiB"]
    losses = _run_example("torchvision_train", argv, monkeypatch)
    assert len(losses) == 3 and all(loss == loss for loss in losses)
