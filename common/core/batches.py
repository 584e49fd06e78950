"""A site's records as token ids, and batches of them: padding and the tensors a model takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100
FROZEN_HIDDEN = "frozen_hidden"  # a batch's cached hidden states (`train.cache_frozen`)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int] | int  # per-token targets (causal LM) or class index (seq-cls)


def collate(batch: Sequence[Encoded], pad_id: int, width: int = 0) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch, or to ``width`` tokens when given (DP-SGD: a
    record's computation then never depends on the others' lengths).

    Causal LMs are padded on the left (the answer ends every row, so its logits are the last
    positions) with position ids that start at each row's first real token. Classifiers are padded
    on the right: encoders pool position 0 (`[CLS]`).
    """
    longest = max(len(e.input_ids) for e in batch)
    if width and longest > width:
        raise ValueError(f"a record of {longest} tokens is longer than the padding width {width}")
    width = width or longest
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    causal = isinstance(batch[0].labels, list)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long) if causal else None
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        span = slice(width - n, width) if causal else slice(0, n)
        ids[i, span] = torch.tensor(e.input_ids)
        mask[i, span] = 1
        if labels is not None and isinstance(e.labels, list):
            labels[i, span] = torch.tensor(e.labels)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is None:
        out["labels"] = torch.tensor([int(e.labels) for e in batch])  # type: ignore[arg-type]
    else:
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        out["labels"] = labels
    hidden = getattr(batch[0], "hidden", None)
    if hidden is not None:  # `train.cache_frozen` (client.frozen): padded like the ids, zeros
        states = torch.zeros((len(batch), width, hidden.size(-1)), dtype=hidden.dtype)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            states[i, slice(width - n, width) if causal else slice(0, n)] = e.hidden  # type: ignore[attr-defined]
        out[FROZEN_HIDDEN] = states
    return out
