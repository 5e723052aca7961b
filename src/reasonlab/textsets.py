"""Text-set names: a prepared dataset, or `<dataset>@<model>@<ckpt>`, one checkpoint's generations.

The one place that knows this grammar: the config check, the planning module, the scorer and the
report all parse and print text-set names through these functions. Imports nothing.
"""

from __future__ import annotations

import re
from typing import NamedTuple

NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # a model, checkpoint or dataset name (a path component)
TEXTSET = rf"{NAME}(?:@{NAME}@{NAME})?"
SELF = "self"  # a checkpoint's own generations, as aggregated tables call them


class TextSet(NamedTuple):
    """A parsed text-set name: `dataset`, and for generations the generating `model` and `ckpt`."""

    dataset: str
    model: str | None = None
    ckpt: str | None = None

    @property
    def generated(self) -> bool:
        return self.model is not None

    @property
    def generator(self) -> str | None:
        """`<model>/<ckpt>` of a generated text set."""
        return f"{self.model}/{self.ckpt}" if self.generated else None

    def __str__(self) -> str:
        return f"{self.dataset}@{self.model}@{self.ckpt}" if self.generated else self.dataset


def parse(name: str) -> TextSet:
    """`'demo-eval'` -> TextSet('demo-eval'); `'demo-eval@tiny@final'` -> TextSet('demo-eval', 'tiny', 'final').

    Raises ValueError for anything else (the config check turns it into a message per part).
    """
    if not re.fullmatch(TEXTSET, name):
        raise ValueError(
            f"{name!r} is neither a dataset name nor '<dataset>@<model>@<ckpt>' (generations of a checkpoint)"
        )
    return TextSet(*name.split("@"))


def generated(dataset: str, model: str, ckpt: str) -> str:
    """The name of a checkpoint's generations on a dataset as a text set."""
    return str(TextSet(dataset, model, ckpt))


def label(textset: str, model: str, ckpt: str) -> str:
    """How aggregated tables name a text set scored under `model/ckpt`: a checkpoint's own
    generations become `<dataset>@self`, so they line up across checkpoints."""
    t = parse(textset)
    if t.generated and (t.model, t.ckpt) == (model, ckpt):
        return f"{t.dataset}@{SELF}"
    return textset
