"""The per-item reader, trained the way speed-runs train (docs/recipes.md): python docs/experiments/reader_ablation.py
ROWS OUT.jsonl [SEEDS]

Each row is today's reader (task=reader: the cnn with two 3x3 convs per stage, a dense layer of 256, AdamW 4e-3 at
batch 256 with a warm-up epoch and cosine decay, label smoothing 0.1, an EMA of the weights, flips and 2-pixel
shifts, bf16) with one feature of airbench (Keller Jordan, arXiv 2404.00498) or of "How to train your ResNet"
(D. Page) added, or a combination of them; trained on the 55,000 training items of the project's split and scored
on its 5,000 validation items after every epoch (the weights that are kept: the EMA or the lookahead average).
ROWS: comma-separated names of ROWS below; SEEDS: comma-separated (default 0,1,2). One JSON line per (row, seed)
with the best and last validation accuracy (plain, with flips, with flips x shifts), the epochs and the training
seconds per epoch. `python docs/experiments/reader_ablation.py --table OUT.jsonl` prints the markdown table of
docs/recipes.md: per row, the mean and standard deviation over its seeds. The test items are never read here: only the recipe chosen from this table is run
by `python -m cnnrnn.train task=reader` and tested there.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from cnnrnn.data import fashion_mnist
from cnnrnn.data.augment import Augment
from cnnrnn.models.cnn import SmallCNN

MEAN, STD = 0.2860, 0.3530
BASE = dict(epochs=10, lr=4e-3, wd=0.05, ls=0.1, bs=256, warmup=1.0, opt="adamw", shift=2, flips="random",
            whiten=False, dirac=False, bn=False, average="ema", amp=True)
ROWS = {
    "base10": {}, "base15": dict(epochs=15), "base20": dict(epochs=20), "base30": dict(epochs=30),
    "whiten": dict(whiten=True), "dirac": dict(dirac=True), "bn64": dict(bn=True),
    "lookahead": dict(average="lookahead"), "altflip": dict(flips="alternate"),
    "ls0.2": dict(ls=0.2), "sgd_tri": dict(opt="sgd", lr=0.1, wd=5e-4, warmup=2.0), "fp32": dict(amp=False),
}


def whitening(images: torch.Tensor, k: int = 3, eps: float = 5e-4) -> torch.Tensor:
    """Frozen patch-whitening filters (2*k*k, 1, k, k) from the covariance of k x k patches of the training items:
    each eigenvector scaled by 1/sqrt(eigenvalue), and its negative (airbench's first layer)."""
    x = (images[:5000].float() / 255 - MEAN) / STD                                    # (N, 1, 28, 28)
    patches = F.unfold(x, k).transpose(1, 2).reshape(-1, k * k).double()              # (N*L, k*k)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    values, vectors = torch.linalg.eigh(cov)
    filters = (vectors.T / (values + eps).sqrt()[:, None]).float().view(k * k, 1, k, k)
    return torch.cat([filters, -filters])


def build(job: dict, train_images: torch.Tensor) -> nn.Module:
    model = SmallCNN(channels=(32, 64), convs=2, hidden=256, dropout=0.3)
    layers = list(model.encoder.layers)
    if job["whiten"]:  # the first conv becomes a frozen whitening layer of 18 filters; the next takes 18 channels
        filters = whitening(train_images)
        first = nn.Conv2d(1, len(filters), 3, padding=1, bias=False)
        first.weight.data.copy_(filters)
        first.weight.requires_grad_(False)
        layers[0], layers[1] = first, nn.BatchNorm2d(len(filters))
        layers[3] = nn.Conv2d(len(filters), layers[3].out_channels, 3, padding=1, bias=False)
        model.encoder.layers = nn.Sequential(*layers)
    for m in model.modules():
        if job["dirac"] and isinstance(m, nn.Conv2d) and m.weight.requires_grad and m.in_channels > 1:
            nn.init.dirac_(m.weight.data[:m.in_channels])  # identity on the first in_channels filters
        if job["bn"] and isinstance(m, nn.BatchNorm2d):
            m.weight.requires_grad_(False)  # scale off (fixed at 1); its bias trains at 64x the rate below
            m.momentum = 0.4
    return model


def optimizer(job: dict, model: nn.Module, steps: int):
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bn_bias = job["bn"] and p.ndim == 1 and "dense" not in name and "head" not in name
        lr = job["lr"] * (64 if bn_bias and job["opt"] == "sgd" else 8 if bn_bias else 1)  # AdamW: 8x is its 64x
        groups.setdefault((lr, job["wd"] if p.ndim > 1 else 0.0), []).append(p)
    groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    if job["opt"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=job["lr"], fused=True)
    else:
        opt = torch.optim.SGD(groups, lr=job["lr"], momentum=0.9, nesterov=True, fused=True)
    total, warm = job["epochs"] * steps, int(job["warmup"] * steps)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        left = min(1.0, (s - warm) / max(1, total - warm))
        return 1 - left if job["opt"] == "sgd" else 0.5 * (1 + math.cos(math.pi * left))  # triangle or cosine

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Average:
    """The kept weights: an EMA (decay 0.999, warm-up (1+n)/(10+n)) after every step, or airbench's lookahead:
    every 5 steps the average moves toward the model with a decay that ramps up late, and the model is reset to it."""

    def __init__(self, model: nn.Module, kind: str, total: int):
        self.model, self.kind, self.total, self.n = model, kind, total, 0
        self.avg = copy.deepcopy(model)

    def pairs(self):
        return [(a, c) for a, c in zip((*self.avg.parameters(), *self.avg.buffers()),
                                       (*self.model.parameters(), *self.model.buffers()))]

    @torch.no_grad()
    def step(self) -> None:
        self.n += 1
        if self.kind == "ema":
            d = min(0.999, (1 + self.n) / (10 + self.n))
            for a, c in self.pairs():
                a.lerp_(c, 1 - d) if a.is_floating_point() else a.copy_(c)
        elif self.n % 5 == 0:
            d = 0.95 ** 5 * (self.n / self.total) ** 3
            for a, c in self.pairs():
                if a.is_floating_point():
                    a.lerp_(c, 1 - d)
                    c.copy_(a)
                else:
                    a.copy_(c)


@torch.no_grad()
def accuracy(net: nn.Module, split, amp: bool) -> tuple[float, float, float]:
    """Validation accuracy: plain, averaged with the mirror image (flips), and averaged over flips x +-1-pixel
    shifts of both (airbench's test-time augmentation: 2 x 5 views)."""
    net.eval()
    right = [0, 0, 0]
    for i in range(0, len(split), 1000):
        x = ((split.images[i:i + 1000].float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)
        views = []
        for v in (x, x.flip(-1)):
            padded = F.pad(v, (1, 1, 1, 1))
            views += [v] + [padded[..., 1 + dy:29 + dy, 1 + dx:29 + dx] for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            probs = [net(v).float().softmax(1) for v in views]
        y = split.labels[i:i + 1000]
        for k, p in enumerate((probs[0], probs[0] + probs[5], sum(probs))):
            right[k] += (p.argmax(1) == y).sum().item()
    return tuple(r / len(split) for r in right)


def run(job: dict) -> dict:
    torch.manual_seed(job["seed"])
    data = fashion_mnist.splits("data/", 5000)
    train, val = data["train"], data["val"]
    model = build(job, train.images).to(memory_format=torch.channels_last)
    steps = len(train) // job["bs"]
    opt, sched = optimizer(job, model, steps)
    average = Average(model, job["average"], job["epochs"] * steps)
    aug = Augment(hflip=0.5 if job["flips"] == "random" else 0.0, shift=job["shift"])
    first_flip = torch.rand(len(train), generator=torch.Generator().manual_seed(job["seed"] + 7)) < 0.5
    curve, t_train = [], 0.0
    for epoch in range(job["epochs"]):
        model.train()
        t = time.time()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(job["seed"] * 1000 + epoch))
        for s in range(steps):
            idx = order[s * job["bs"]:(s + 1) * job["bs"]]
            images = aug(train.images[idx], (epoch * 100003 + s) % 2**31)
            if job["flips"] == "alternate":  # each item flipped every other epoch, from a random start
                flip = first_flip[idx] ^ bool(epoch % 2)
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            x = ((images.float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=job["amp"]):
                loss = F.cross_entropy(model(x).float(), train.labels[idx], label_smoothing=job["ls"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            average.step()
        t_train += time.time() - t
        curve.append(accuracy(average.avg, val, job["amp"]))
    best = max(range(len(curve)), key=lambda e: curve[e][0])
    return {**job, "val_best": curve[best][0], "best_epoch": best + 1, "val_flip_at_best": curve[best][1],
            "val_flip_shift_at_best": curve[best][2], "val_last": curve[-1][0], "val_flip_last": curve[-1][1],
            "val_flip_shift_last": curve[-1][2], "train_s_per_epoch": round(t_train / job["epochs"], 2),
            "curve": curve}


def table(path: str) -> str:
    """Mean and standard deviation over seeds of each row's best validation accuracy, plain, with flips and with
    flips x shifts; its epochs and training seconds per epoch."""
    by_row: dict[str, list[dict]] = {}
    for line in open(path):
        r = json.loads(line)
        by_row.setdefault(r["row"], []).append(r)
    lines = ["| row | epochs | s/epoch | seeds | val | val, flips | val, flips x shifts |", "|---|--:|--:|--:|--:|--:|--:|"]
    for row, rs in by_row.items():
        cells = []
        for key in ("val_best", "val_flip_at_best", "val_flip_shift_at_best"):
            v = [100 * r[key] for r in rs]
            cells.append(f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""))
        seconds = sorted(r["train_s_per_epoch"] for r in rs)[len(rs) // 2]
        lines.append(f"| {row} | {rs[0]['epochs']} | {seconds:.1f} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--table":
        print(table(sys.argv[2]))
        sys.exit()
    rows, out = sys.argv[1].split(","), sys.argv[2]
    seeds = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,1,2").split(",")]
    for seed in seeds:
        for row in rows:
            result = run({**BASE, **ROWS[row], "row": row, "seed": seed})
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(row, seed, result["val_best"], result["val_flip_at_best"], result["val_flip_shift_at_best"],
                  result["train_s_per_epoch"], flush=True)
