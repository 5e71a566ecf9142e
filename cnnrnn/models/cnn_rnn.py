"""The per-item reader on every cell of a grid (or slid over a whole picture) + an LSTM label decoder with soft
attention over those positions: names the items of a picture one after another.

Tokens: 0..C-1 are the classes, C is END, C+1 is START. The decoder's output vocabulary is the C classes
plus END. Training feeds given (teacher) tokens; `generate` feeds only the model's own outputs.
target='set' names each class once; 'multiset' names one label per item, so a class may repeat.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnrnn.models.cnn import ReadsCells, SmallCNN

Teacher = Callable[[int, torch.Tensor], torch.Tensor]  # (step, logits (B, C+1)) -> next tokens (B,)
# A cell whose pixels span less than this (normalised input: about 9 of 255 grey levels) is empty.
EMPTY_TONE = 0.1


def _follow(t: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Reorder per-beam state t (B, K, ...) to follow each new beam's parent (B, K)."""
    return t.gather(1, parent.view(*parent.shape, *([1] * (t.dim() - 2))).expand_as(t))  # (B, K) -> (B, K, 1...)


class CNNRNN(ReadsCells):
    """Features of cells or windows from the reader -> LSTM over label embeddings, attending over them at each step."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, ...] = (32, 64), convs: int = 2,
                 cell_dim: int = 256, embed: int = 64, hidden: int = 256, attention: bool = True, attn_dim: int = 128,
                 dropout: float = 0.3,
                 beam_size: int = 1, max_labels: int = 4, feedback: bool = True, target: str = "set",
                 encoder: str = "auto", side: int = 28, in_channels: int = 1):
        super().__init__()
        if target not in ("set", "multiset"):
            raise ValueError(f"target must be 'set' or 'multiset', got {target!r}")
        self.multiset = target == "multiset"
        self.num_classes, self.end, self.start = num_classes, num_classes, num_classes + 1
        # max_labels is one label per cell of the largest training picture: also that picture's number of cells
        # attention=False: every step reads the plain mean of the cells (the ablation of where to look)
        self.attention, self.beam_size, self.max_labels = attention, beam_size, max_labels
        # feedback=False is the ablation: every step is fed the same (START) embedding instead of the label it
        # emitted before, so the decoder still attends step by step but never sees its own outputs.
        self.feedback = feedback
        # the per-item reader (a single-label model of its own: its checkpoint loads here as it is)
        self.reader = SmallCNN(num_classes, channels, convs, cell_dim, dropout, side, in_channels)
        # cells: the reader on each cell of a grid; picture: slid over the whole picture; auto: build.model decides
        self.encoder = "picture" if encoder == "picture" else "cells"
        feat = cell_dim
        self.embed = nn.Embedding(num_classes + 2, embed)
        self.init_h = nn.Linear(feat, hidden)
        self.init_c = nn.Linear(feat, hidden)
        self.attn_feat = nn.Linear(feat, attn_dim)
        self.attn_hidden = nn.Linear(hidden, attn_dim, bias=False)
        self.attn_score = nn.Linear(attn_dim, 1, bias=False)
        self.cell = nn.LSTMCell(embed + feat, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden + feat, num_classes + 1)

    def encode(self, x: torch.Tensor, flip: bool = False):
        """Features (B, L, D), their attention keys (B, L, A), the initial LSTM state and the cells read (B, L)
        bool (None: all; see `cells_read`). `x`: pictures (B, C, H, W), or cell features (B, L, D) the reader gave
        before (a frozen reader's, computed once). With `flip`, each cell's features are averaged with its mirror
        image's (test-time flips)."""
        feats = self.read(x, flip)                                      # (B, L, D)
        s = self.reader.side
        read = None if x.dim() == 3 or self.encoder != "cells" else self.cells_read(x, x.shape[-2] // s,
                                                                                     x.shape[-1] // s)
        if read is None:
            mean = feats.mean(dim=1)                             # (B, D)
        else:
            mean = (feats * read[..., None]).sum(1) / read.sum(1, keepdim=True)   # (B, D): of the cells read
        keys = self.attn_feat(feats)
        return feats, keys, (torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))), read

    def cells_read(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor | None:
        """On a picture of more cells than the largest training picture, the cells the decoder reads (B, L):
        every occupied one and, of the empty ones (one flat tone), the first in reading order, as many as make
        up the training picture's number of cells. None (all) on a picture of at most that many cells.

        The decoder learned when to say END on pictures of `max_labels` cells: with the surplus empty cells of
        a larger picture in its mean and its attention, it stopped early (docs/grids.md)."""
        if h * w <= self.max_labels:
            return None
        cells = x.unflatten(2, (h, -1)).unflatten(4, (w, -1))   # (B, C, H, W) -> (B, C, h, H/h, w, W/w)
        tone = cells.amax(dim=(1, 3, 5)) - cells.amin(dim=(1, 3, 5))                # (B, h, w)
        empty = (tone < EMPTY_TONE).flatten(1)                                       # (B, L)
        spare = (self.max_labels - (~empty).sum(1, keepdim=True)).clamp(min=0)       # (B, 1)
        return ~empty | (empty.cumsum(1) <= spare)

    def step(self, tokens: torch.Tensor, state, feats: torch.Tensor, keys: torch.Tensor,
             read: torch.Tensor | None = None):
        """One decoding step: logits (B, C+1), the new state and the attention weights (B, L), zero on the
        cells not read."""
        h, c = state
        if self.attention:
            scores = self.attn_score(torch.tanh(keys + self.attn_hidden(h)[:, None])).squeeze(-1)  # (B, L)
        else:
            scores = torch.zeros_like(feats[..., 0])                                    # (B, L): uniform
        if read is not None:
            scores = scores.masked_fill(~read, float("-inf"))
        alpha = scores.softmax(dim=1)                                                           # (B, L)
        context = torch.bmm(alpha[:, None], feats).squeeze(1)           # (B, 1, L) @ (B, L, D) -> (B, D)
        if not self.feedback:
            tokens = torch.full_like(tokens, self.start)
        h, c = self.cell(torch.cat([self.embed(tokens), context], dim=1), (h, c))
        logits = self.out(self.drop(torch.cat([h, context], dim=1)))
        return logits, (h, c), alpha

    def forward(self, x: torch.Tensor, teacher: torch.Tensor | Teacher, steps: int | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, T, C+1). `teacher` is the target tokens (B, T), fed back shifted by
        one, or a function choosing each step's target from that step's logits (orderless training)."""
        feats, keys, state, read = self.encode(x)
        steps = teacher.shape[1] if isinstance(teacher, torch.Tensor) else steps
        tokens = torch.full((x.shape[0],), self.start, dtype=torch.long, device=x.device)
        logits = []
        for t in range(steps):
            step_logits, state, _ = self.step(tokens, state, feats, keys, read)
            logits.append(step_logits)
            target = teacher[:, t] if isinstance(teacher, torch.Tensor) else teacher(t, step_logits)
            tokens = target.clamp(min=0)  # padding (-100) after END is never scored; feed any valid token
        return torch.stack(logits, dim=1)

    def _allowed(self, counts: torch.Tensor, t: int, limit: int) -> torch.Tensor:
        """Mask (…, C+1) of tokens that may come next, from the labels emitted so far (counts (…, C)): only END
        once `limit` labels are out; before that no label twice (set), or any label (multiset: one per item, so
        a repeat is allowed exactly while fewer labels than cells are out)."""
        fresh = torch.ones_like(counts, dtype=torch.bool) if self.multiset else counts == 0
        if t >= limit:
            fresh = torch.zeros_like(fresh)
        return torch.cat([fresh, torch.ones_like(fresh[..., :1])], dim=-1)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, beam_size: int | None = None, flip: bool = False,
                 max_labels: int | None = None) -> dict[str, torch.Tensor]:
        """Decode from the image alone (`flip`: test-time flips, see encode), at most `max_labels` labels
        (default: the model's). Returns 'labels' (B, C) bool, 'counts' (B, C) labels emitted per class, 'scores'
        (B, C) each class's highest probability over the decoding steps, 'tokens' (B, T) (END-padded) and
        'alpha' (B, T, L)."""
        beam_size = beam_size or self.beam_size
        limit = max_labels or self.max_labels
        encoded = self.encode(x, flip)
        out = self._greedy(x, encoded, limit) if beam_size == 1 else self._beam(x, beam_size, encoded, limit)
        out["labels"] = out["counts"] > 0
        pad = limit + 1 - out["tokens"].shape[1]  # decoding stops early once every image is done
        if pad:
            out["tokens"] = F.pad(out["tokens"], (0, pad), value=self.end)
            out["alpha"] = F.pad(out["alpha"], (0, 0, 0, pad))
        return out

    def _greedy(self, x: torch.Tensor, encoded=None, limit: int | None = None) -> dict[str, torch.Tensor]:
        """Greedy decoding; tensor ops only, so an ONNX export traces this very code (the early stop, once every
        image is done, is skipped while tracing: the steps after it only repeat END)."""
        feats, keys, state, read = encoded or self.encode(x)
        b, c, limit = x.shape[0], self.num_classes, limit or self.max_labels  # shape[0]: a free batch in a trace
        tokens = torch.full((b,), self.start, dtype=torch.long, device=x.device)
        counts = torch.zeros(b, c, dtype=torch.long, device=x.device)
        done = torch.zeros(b, dtype=torch.bool, device=x.device)
        scores = torch.zeros(b, c, device=x.device)
        out, alphas = [], []
        for t in range(limit + 1):
            logits, state, alpha = self.step(tokens, state, feats, keys, read)
            probs = logits.float().softmax(dim=1)
            scores = torch.where(done[:, None], scores, torch.maximum(scores, probs[:, :c]))
            tokens = logits.masked_fill(~self._allowed(counts, t, limit), float("-inf")).argmax(dim=1)
            tokens = torch.where(done, torch.full_like(tokens, self.end), tokens)
            counts = counts + F.one_hot(tokens, c + 1)[:, :c]
            done = done | (tokens == self.end)
            out.append(tokens)
            alphas.append(alpha)
            if not torch.jit.is_tracing() and bool(done.all()):
                break
        return {"labels": counts > 0, "counts": counts, "scores": scores, "tokens": torch.stack(out, 1),
                "alpha": torch.stack(alphas, 1)}

    def _beam(self, x: torch.Tensor, k: int, encoded=None, limit: int | None = None) -> dict[str, torch.Tensor]:
        feats, keys, (h, c), read = encoded or self.encode(x)
        b, n, v, limit = x.shape[0], self.num_classes, self.num_classes + 1, limit or self.max_labels
        dev = x.device

        def tile(t):  # (B, ...) -> (B*K, ...)
            return None if t is None else t.repeat_interleave(k, dim=0)

        feats, keys, h, c, read = tile(feats), tile(keys), tile(h), tile(c), tile(read)
        tokens = torch.full((b * k,), self.start, dtype=torch.long, device=dev)
        logp = torch.full((b, k), float("-inf"), device=dev)
        logp[:, 0] = 0.0                                    # one live beam at first, so none are duplicates
        counts = torch.zeros(b, k, n, dtype=torch.long, device=dev)
        done = torch.zeros(b, k, dtype=torch.bool, device=dev)
        scores = torch.zeros(b, k, n, device=dev)
        history = torch.zeros(b, k, 0, dtype=torch.long, device=dev)
        alphas = torch.zeros(b, k, 0, feats.shape[1], device=dev)
        for t in range(limit + 1):
            logits, (h, c), alpha = self.step(tokens, (h, c), feats, keys, read)
            step_logp = logits.float().log_softmax(dim=1).view(b, k, v)          # (B*K, V) -> (B, K, V)
            step_logp = step_logp.masked_fill(~self._allowed(counts, t, limit), float("-inf"))
            # A finished beam continues only with END, at no cost, so it keeps its score.
            finished = torch.full_like(step_logp, float("-inf"))
            finished[..., self.end] = 0.0
            step_logp = torch.where(done[..., None], finished, step_logp)
            total = (logp[..., None] + step_logp).view(b, k * v)                 # (B, K*V)
            logp, flat = total.topk(k, dim=1)                                    # (B, K)
            parent, tokens2d = flat // v, flat % v
            counts, done, scores, history, alphas = (_follow(t_, parent) for t_ in (counts, done, scores, history,
                                                                                    alphas))
            rows = (parent + torch.arange(b, device=dev)[:, None] * k).flatten()  # (B, K) -> (B*K,) parents' rows
            h, c = h[rows], c[rows]
            probs = logits.float().softmax(dim=1)[rows].view(b, k, v)[..., :n]  # (B*K, V) -> (B, K, C)
            scores = torch.where(done[..., None], scores, torch.maximum(scores, probs))
            counts = counts + F.one_hot(tokens2d, v)[..., :n]
            done = done | (tokens2d == self.end)
            history = torch.cat([history, tokens2d[..., None]], dim=2)
            alphas = torch.cat([alphas, alpha[rows].view(b, k, 1, -1)], dim=2)  # (B*K, L) -> (B, K, 1, L)
            tokens = tokens2d.flatten()                                          # (B, K) -> (B*K,)
            if done.all():
                break
        best = logp.argmax(dim=1)                                                # (B,)
        sel = lambda t_: t_[torch.arange(b, device=dev), best]  # noqa: E731
        return {"labels": sel(counts) > 0, "counts": sel(counts), "scores": sel(scores), "tokens": sel(history),
                "alpha": sel(alphas)}
