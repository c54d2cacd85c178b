"""Training data: quotes as a `datasets.Dataset` with the seed's columns, and a stable split.

A quote's split (train or eval) is a function of its normalized text alone, so adding quotes
never moves an existing quote between splits, and a quote saved twice lands in the same split.
Tokenizing is the trainer's job; rows here are plain text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from core.store.records import Quote, normalize

if TYPE_CHECKING:
    import datasets

Split = Literal["train", "eval"]


def split_of(text: str, eval_percent: int) -> Split:
    """The split a quote belongs to: `eval_percent` of all texts, chosen by a hash."""
    digest = hashlib.sha256(("split:" + normalize(text)).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "eval" if bucket < eval_percent else "train"


def to_dataset(
    quotes: Sequence[Quote], eval_percent: int, split: Split | None = None
) -> datasets.Dataset:
    """`quotes` as a Dataset of `quote`, `author` and `id` (all, or one split), in the given
    order. The id lets a training record which quotes it saw (consent reaches the weights)."""
    import datasets  # a heavy import: only paid when training data is asked for

    chosen = [q for q in quotes if split is None or split_of(q.text, eval_percent) == split]
    features = datasets.Features(
        {
            "quote": datasets.Value("string"),
            "author": datasets.Value("string"),
            "id": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "quote": [q.text for q in chosen],
            "author": [q.author for q in chosen],
            "id": [q.id for q in chosen],
        },
        features=features,
    )
