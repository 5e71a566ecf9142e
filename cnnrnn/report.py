"""What a run reports at the end, shared by train and evaluate: test metrics, the tile oracle, figures."""
from __future__ import annotations

import torch
from torch import nn

from cnnrnn import build, viz
from cnnrnn.data.fashion_mnist import CLASSES
from cnnrnn.data.loader import batches
from cnnrnn.engine import evaluate
from cnnrnn.metrics import confusion
from cnnrnn.tasks import TileOracle

EVAL_BATCH = 500  # fixed, so that evaluate reproduces a run's numbers exactly
# Scalars logged per epoch (and at the end under test/); per-class values go to metrics.json only.
SCALARS = {"single": ("acc", "loss"),
           "multi": ("f1_micro", "f1_macro", "f1_samples", "cf1", "exact_match", "hamming_loss", "cardinality_acc",
                     "map", "loss", "grounding", "grounding_mass",  # grounding: the decoder only
                     "multiset_exact", "count_acc", "multiset_f1_micro", "multiset_f1_macro", "count_mae")}  # multiset
AT_HALF = ("f1_micro", "f1_macro", "f1_samples", "exact_match", "hamming_loss")


def scalar_names(kind: str) -> tuple[str, ...]:
    return SCALARS["single" if kind == "single" else "multi"]


def score(model: nn.Module, task, source, device: torch.device, amp: bool = False, with_loss: bool = True):
    """(metrics, predictions, targets) of a whole split."""
    # A fixed seed for what scoring draws (the targets of model.label_order=random), so that evaluate reproduces
    # the run's loss; forked, so the training stream (and exact resume) is untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.manual_seed(0)
        return evaluate(model, task, batches(source, EVAL_BATCH), device=device, amp=amp, with_loss=with_loss)


def score_test(model: nn.Module, task, source, device: torch.device, amp: bool = False):
    """test/* metrics; for the BCE baseline also at the untuned threshold 0.5 (test/KEY_at_0.5)."""
    metrics, out, target = score(model, task, source, device, amp)
    results = {f"test/{k}": v for k, v in metrics.items()}
    if task.kind == "bce":
        half = task.metrics({"pred": out["scores"] >= 0.5, "scores": out["scores"]}, target)
        results.update({f"test/{k}_at_0.5": half[k] for k in AT_HALF})
    return results, out, target


def score_oracle(path, grid: int, source, device: torch.device) -> dict:
    """oracle/* metrics: the task=cnn checkpoint at `path` on each occupied cell of the same composites."""
    model = build.oracle_model(path, device)
    metrics, _, _ = score(model, TileOracle(grid), source, device, with_loss=False)
    return {**{f"oracle/{k}": v for k, v in metrics.items()}, "oracle/ckpt": str(path)}


def write_figures(writer, kind: str, task, source, out: dict, target: torch.Tensor, step: int, folder=None) -> None:
    """Confusion matrix and misclassified items, or labelled composites, per-class F1 and attention maps;
    to TensorBoard, and as PNG files into `folder` when given."""
    names = lambda idx: [CLASSES[i] for i in idx]  # noqa: E731
    tensorboard = writer

    class Both:  # add_figure that also keeps a PNG
        @staticmethod
        def add_figure(tag, fig, global_step):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                fig.savefig(folder / f"{tag.replace('/', '_')}.png", dpi=110)
            tensorboard.add_figure(tag, fig, global_step)

    writer = Both()
    if kind == "single":
        cm = confusion(target.numpy(), out["pred"].numpy(), len(CLASSES))
        writer.add_figure("test/confusion_matrix", viz.confusion_matrix(cm, CLASSES), step)
        wrong = (out["pred"] != target).nonzero().flatten()[:24]
        batch = {k: v.cpu() for k, v in source.batch(source.order(None)[wrong]).items()}  # for the figure
        fig = viz.labelled_grid(batch["image"], [names([int(t)]) for t in target[wrong]],
                                [names([int(p)]) for p in out["pred"][wrong]])
        writer.add_figure("test/misclassified", fig, step)
        return
    first = torch.arange(min(24, len(target)))
    batch = {k: v.cpu() for k, v in source.batch(source.order(None)[first]).items()}  # for the figures
    pred = task.labels({k: v[first] for k, v in out.items()})
    # a class as often as the target counts it (once for a set; a multiset target repeats it)
    true = [names([c for c in row.nonzero().flatten().tolist() for _ in range(int(row[c]))]) for row in target[first]]
    writer.add_figure("test/composites", viz.labelled_grid(batch["image"], true, [names(p) for p in pred]), step)
    per_class = {k[3:]: v for k, v in task.metrics(out, target).items() if k.startswith("f1/")}
    writer.add_figure("test/f1_per_class", viz.per_class_bars(per_class, "test F1"), step)
    if "alpha" in out:
        n = min(6, len(target))
        fig = viz.attention(batch["image"][:n], out["alpha"][:n], out["tokens"][:n], CLASSES, len(CLASSES))
        writer.add_figure("test/attention", fig, step)
