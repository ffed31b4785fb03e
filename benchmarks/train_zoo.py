"""Train the zoo models on CIFAR-10 and write their weights and model cards.

Run: `make zoo` (all three) or `python benchmarks/train_zoo.py darknet --epochs 15`.
Writes src/enclaveml/models/weights/{name}.safetensors and {name}.json (test accuracy, epochs,
wall time, machine, command). Augmentation: random 4-pixel-padded crops and horizontal flips.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from enclaveml.data.folder import load_image_folder, to_model_input
from enclaveml.models import zoo
from enclaveml.models.layers import layer_state_dict

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def augment(x_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4, reflect) and horizontal flip on a uint8 batch."""
    n, _, h, w = x_u8.shape
    padded = F.pad(x_u8.float(), (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # n,h
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # n,w
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model, x_u8, y, pre, batch=500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(to_model_input(x_u8[i:i + batch], pre))
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / len(y)


def train(name: str, data: Path, epochs: int, batch: int, lr: float, seed: int) -> dict:
    e = zoo.entry(name)
    pre = e.preprocessing
    t0 = time.time()
    tr = load_image_folder(data / "train", pre)
    te = load_image_folder(data / "test", pre)
    print(f"[{name}] data: {len(tr)} train, {len(te)} test, loaded in {time.time() - t0:.0f}s", flush=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = e.build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(tr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    t_train = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=gen)
        tot, n = 0.0, 0
        for i in range(0, len(tr), batch):
            idx = perm[i:i + batch]
            x = pre.normalise(augment(tr.images[idx], gen).div_(255.0))
            loss = F.cross_entropy(model(x), tr.labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss) * len(idx)
            n += len(idx)
        acc = evaluate(model, te.images, te.labels, pre) if (ep + 1) % 3 == 0 or ep + 1 == epochs else float("nan")
        print(f"[{name}] epoch {ep + 1}/{epochs} loss {tot / n:.3f} test acc {acc:.4f} ({time.time() - t_train:.0f}s)", flush=True)
    wall = time.time() - t_train
    acc = evaluate(model, te.images, te.labels, pre)
    model.eval()
    zoo.WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    save_file(layer_state_dict(model), str(e.weights_path))
    card = {
        "name": name,
        "description": e.description,
        "dataset": "CIFAR-10 (JPEG image folders, ../shared/data/cifar10)",
        "test_accuracy": round(acc, 4),
        "epochs": epochs,
        "batch": batch,
        "max_lr": lr,
        "seed": seed,
        "train_seconds": round(wall, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "command": "python benchmarks/train_zoo.py " + " ".join(sys.argv[1:]),
    }
    e.card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card), flush=True)
    return card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", default=list(zoo.ZOO))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for name in a.names:
        train(name, a.data, a.epochs, a.batch, a.lr, a.seed)


if __name__ == "__main__":
    main()
