"""Scenes: which items a composite holds. `uniform` draws them independently; a scene file (YAML, e.g.
configs/scene/outfit.yaml) is a small generative model in which labels depend on each other.

A scene file: `styles`, each with a probability `p` and `slots`; a slot is filled with probability `p` by one
class drawn from its `classes` weights. `noise` is the probability that a filled slot takes a uniformly random
class instead, so no label is ever certain from context alone. One style per composite; its filled slots, in
file order, become the items (at most max_items; at least one: the first slot when none is filled), each
a random item of its class from the split, in random cells.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from cnnrnn.errors import UserError


class Scene:
    """A parsed scene file over the data's class names; `sample` returns layouts as composite.sample_layout does,
    from the split's labels."""

    def __init__(self, spec: dict, name: str, classes: tuple[str, ...]):
        self.classes = classes
        styles = spec.get("styles")
        where = f"scene {name}"
        if not isinstance(styles, dict) or not styles:
            raise UserError(f"{where} has no 'styles' mapping; see configs/scene/outfit.yaml for the format.")
        self.noise = _number(spec.get("noise", 0.0), f"{where}: noise", 0, 1)
        n_slots = max(len(s.get("slots") or []) if isinstance(s, dict) else 0 for s in styles.values())
        self.style_p = torch.zeros(len(styles))
        self.slot_p = torch.zeros(len(styles), n_slots)
        self.weights = torch.zeros(len(styles), n_slots, len(classes))
        for i, (style, body) in enumerate(styles.items()):
            if not isinstance(body, dict) or not isinstance(body.get("slots"), list) or not body["slots"]:
                raise UserError(f"{where}: style '{style}' needs a probability 'p' and a list of 'slots'.")
            self.style_p[i] = _number(body.get("p"), f"{where}: style '{style}' p", 0, math.inf)
            for j, slot in enumerate(body["slots"]):
                at = f"{where}: style '{style}' slot {j + 1}"
                if not isinstance(slot, dict) or not isinstance(slot.get("classes"), dict) or not slot["classes"]:
                    raise UserError(f"{at} needs 'p' and a 'classes' mapping of class name to weight.")
                self.slot_p[i, j] = _number(slot.get("p", 1.0), f"{at} p", 0, 1)
                for cls, w in slot["classes"].items():
                    if cls not in classes:
                        raise UserError(f"{at} names the class '{cls}', which is not one of {', '.join(classes)}.")
                    self.weights[i, j, classes.index(cls)] = _number(w, f"{at} weight of {cls}", 0, math.inf)
                if self.weights[i, j].sum() <= 0:
                    raise UserError(f"{at} gives every class weight 0; give at least one a positive weight.")
        if self.style_p.sum() <= 0:
            raise UserError(f"{where} gives every style probability 0; give at least one a positive p.")
        self.style_p /= self.style_p.sum()
        self.weights[self.weights.sum(-1) == 0] = 1.0  # padding slots (p = 0) still need a valid distribution

    def sample(self, n: int, labels: torch.Tensor, grid: int, min_items: int, max_items: int,
               generator: torch.Generator) -> torch.Tensor:
        cells, c = grid * grid, len(self.classes)
        counts = torch.bincount(labels, minlength=c)
        if (counts == 0).any():
            missing = [self.classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
            raise UserError(f"The split has no item of class {', '.join(missing)}, which the scene draws; "
                            f"raise data.limit.")
        style = torch.multinomial(self.style_p, n, replacement=True, generator=generator)     # (n,)
        filled = torch.rand(n, self.slot_p.shape[1], generator=generator) < self.slot_p[style]  # (n, S)
        filled[~filled.any(1), 0] = True                       # at least one item: the style's first slot
        w = self.weights[style]                                                           # (n, S, C)
        cls = torch.multinomial(w.flatten(0, 1), 1, generator=generator).view(filled.shape)  # (n, S)
        random = torch.rand(filled.shape, generator=generator) < self.noise
        cls = torch.where(random, torch.randint(0, c, filled.shape, generator=generator), cls)
        # slots beyond max_items (in file order) or beyond the grid's cells stay empty
        filled &= filled.cumsum(1) <= min(max_items, cells)
        item = item_of_class(labels, cls, torch.rand(filled.shape, generator=generator), c)  # (n, S)
        slot_pos = filled.cumsum(1) - 1                                                    # j-th filled slot
        order = torch.rand(n, cells, generator=generator).argsort(1)                       # cells in random order
        layout = torch.full((n, cells), -1, dtype=torch.long)
        rows, slots = filled.nonzero(as_tuple=True)
        layout[rows, order[rows, slot_pos[rows, slots]]] = item[rows, slots]
        return layout


def _number(value, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise UserError(f"{where} is {value!r}; it must be a number in [{low}, {high}].")
    return float(value)


def item_of_class(labels: torch.Tensor, cls: torch.Tensor, u: torch.Tensor, num_classes: int) -> torch.Tensor:
    """For each class in cls, the index of a random item of that class (u: uniforms of cls's shape)."""
    by_class = labels.argsort(stable=True)
    counts = torch.bincount(labels, minlength=num_classes)
    start = counts.cumsum(0) - counts
    return by_class[start[cls] + (u * counts[cls]).long().clamp(max=counts[cls] - 1)]


def label_statistics(hot: torch.Tensor) -> dict:
    """Of label sets (n, C) 0/1: class frequencies, P(b present | a present) and the total correlation (bits), how
    much the labels tell about each other."""
    c = hot.shape[1]
    p = hot.mean(0).double()
    joint = (hot.T @ hot).double() / len(hot)                                 # P(a and b)
    cond = joint / p.clamp(min=1e-12)[:, None]                                # row a: P(b | a)

    def h(q):
        q = q.clamp(1e-12, 1)
        return -(q * q.log2())

    codes = (hot.long() * (2 ** torch.arange(c))).sum(1)
    sets = torch.bincount(codes).double() / len(codes)
    marginal = (h(p) + h(1 - p)).sum()
    return {"freq": p.tolist(), "cond": cond.tolist(),
            "total_correlation": float(marginal - h(sets[sets > 0]).sum()), "mean_items": float(hot.sum(1).mean())}


def format_statistics(stats: dict, classes: tuple[str, ...]) -> str:
    """The statistics as a few readable lines for the run log."""
    short = [n.split("/")[0][:7] for n in classes]
    lines = ["class frequency: " + "  ".join(f"{s}={f:.2f}" for s, f in zip(short, stats["freq"])),
             (f"labels per image {stats['mean_items']:.2f}; total correlation {stats['total_correlation']:.3f} "
              f"bits (0 = labels independent); P(column | row present):"),
             "         " + " ".join(f"{s:>7}" for s in short)]
    lines += [f"{short[a]:>8} " + " ".join(f"{v:7.2f}" for v in row) for a, row in enumerate(stats["cond"])]
    return "\n".join(lines)


def read_scene(name: str, folder: Path, classes: tuple[str, ...]) -> dict | None:
    """The spec of data.scene: None for 'uniform', else the YAML of folder/NAME.yaml or of a .yaml path."""
    if name == "uniform":
        return None
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise UserError(f"data.scene={name}: no scene file {path}; choose uniform or one of {', '.join(known)}, "
                        f"or give the path of a scene .yaml file.")
    try:
        spec = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data.scene={name}: {path} is not readable YAML ({str(exc).splitlines()[0]}); "
                        f"fix the file (see configs/scene/outfit.yaml).") from None
    if not isinstance(spec, dict):
        raise UserError(f"data.scene={name}: {path} does not hold a mapping; see configs/scene/outfit.yaml.")
    Scene(spec, name, classes)  # refuse a bad file now, in one sentence
    return spec
