"""Accuracy on a split (computed here: ``evaluate.load`` needs the hub)."""
from __future__ import annotations

import torch

from ..core.progress import progress
from ..data.tasks import batches, n_batches


def length_order(items: list[dict]) -> list[int]:
    """Evaluation order: by length, so a batch pads little (same predictions, faster)."""
    return sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))


def percent_correct(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Accuracy in percent of predicted against true labels."""
    return 100.0 * (pred == true).double().mean().item()


@torch.no_grad()
def predictions(model: torch.nn.Module, items: list[dict], batch_size: int, pad_id: int,
                device: torch.device, desc: str = "evaluate",
                original_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, true labels) in length-sorted order (the engine's), or in the items'
    own order with ``original_order`` so that runs align example by example."""
    model.eval()
    order = length_order(items)
    preds, labels = [], []
    for batch in progress(batches([items[i] for i in order], batch_size, pad_id), desc,
                          total=n_batches(len(items), batch_size)):
        labels.append(batch.pop("labels"))
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        preds.append(logits.argmax(-1).cpu())
    pred, true = torch.cat(preds), torch.cat(labels)
    if original_order:
        where = torch.as_tensor(order)
        pred, true = torch.empty_like(pred).index_copy_(0, where, pred), torch.empty_like(true).index_copy_(0, where, true)
    return pred, true
