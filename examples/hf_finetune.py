"""Fine-tune a Hugging Face causal language model with remat and ``transformers.Trainer``.

    python examples/hf_finetune.py                        # a small Llama-shaped model, built from its config
    python examples/hf_finetune.py --budget 2GiB --lora   # the fastest plan within 2 GiB, LoRA adapters
    python examples/hf_finetune.py --model PATH           # a checkpoint (from_pretrained)

remat plans on the batch the Trainer will pass (``model(**batch)``), and the Trainer trains the
optimized module as it would the model: the module holds the model's own parameters, so the
optimizer, the saved checkpoints and ``model.save_pretrained`` see the trained weights. The
data here is random token blocks; put your tokenized dataset, grouped in blocks of ``--seq``
tokens, in its place (batches of one shape: one plan; for batches that change shape see
``remat.optimize(..., per_shape=8)``).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

import remat


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        config = AutoConfig.for_model(
            "llama", hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64), vocab_size=args.vocab, max_position_embeddings=args.seq,
        )
        model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False  # training keeps no key/value cache (and torch.export cannot return one)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return model.train()  # from_pretrained returns the model in eval mode


def token_blocks(count: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    blocks = torch.randint(0, vocab, (count, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": block, "labels": block} for block in blocks]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a checkpoint to fine-tune (default: a Llama-shaped model from its config)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256, help="tokens per block")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget", help="step peak to fit, e.g. 2GiB (default: the least peak)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    parser.add_argument("--out", default="remat-finetune", help="where the Trainer and the model write")
    args = parser.parse_args(argv)

    model = build_model(args)
    data = token_blocks(args.batch * args.steps, args.seq, model.config.vocab_size)
    batch = default_data_collator(data[: args.batch])  # one batch as the Trainer will pass it
    fast = remat.optimize(model, batch, budget=args.budget)
    print(fast.plan.summary())

    training = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch, max_steps=args.steps, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True,
    )
    trainer = Trainer(model=fast, args=training, train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    model.save_pretrained(args.out)  # the model itself (or its adapters): fast trained its parameters
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


if __name__ == "__main__":
    main()
