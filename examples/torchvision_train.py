"""Train a torchvision model with remat in a plain PyTorch training loop.

    python examples/torchvision_train.py                                  # ResNet-50, batch 32, 224x224
    python examples/torchvision_train.py --model vit_b_16 --budget 6GiB   # the fastest plan within 6 GiB

The loop is the usual one; only the module it calls is remat's. The module holds the model's
own parameters and buffers, so the optimizer is built on ``model.parameters()`` and
``model.state_dict()`` is what was trained. The data here is random images; put your
DataLoader in its place (``drop_last=True`` keeps every batch the shape the plan was made for).
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import remat


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision.models classifier")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget", help="step peak to fit, e.g. 6GiB (default: the least peak)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torchvision.models.get_model(args.model, num_classes=args.classes, image_size=args.size) \
        if args.model.startswith("vit") else torchvision.models.get_model(args.model, num_classes=args.classes)
    model = model.to(device).train()
    images = torch.randn(args.batch * args.steps, 3, args.size, args.size)
    labels = torch.randint(0, args.classes, (len(images),))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch, shuffle=True, drop_last=True)

    x, y = (t.to(device) for t in next(iter(loader)))
    fast = remat.optimize(model, x, loss_fn=lambda out: F.cross_entropy(out, y), budget=args.budget)
    print(fast.plan.summary())

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(fast(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {len(losses)}: loss {loss.item():.4f}")
    if device == "cuda":
        print(f"step peak: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB measured, "
              f"{fast.plan.predicted_peak_bytes / 2**20:.1f} MiB predicted for the first step")
    return losses


if __name__ == "__main__":
    main()
