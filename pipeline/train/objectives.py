"""What each task optimises: which batch fields go into the model, and the summed loss.

The trainer normalises by the target count of the whole global step (see recipe.train_step), so these
return sums, never means: a mean per micro-batch would weigh short and long batches alike.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def model_inputs(batch: dict[str, torch.Tensor], task: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(keyword arguments for the model, labels for our loss)."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    if task == "seq2seq":
        # The model builds decoder inputs by shifting the labels right (decoder_start_token_id
        # first); it also computes its own loss, which we ignore for the summed one below.
        inputs["labels"] = labels
    else:
        # use_cache=False: no KV cache is wanted in training, and without one transformers reads
        # restarting position_ids (bins packing) as separate documents and masks attention between
        # them, on sdpa and eager too, not only flash-attention varlen.
        inputs["use_cache"] = False
    return inputs, labels


def target_count(labels: torch.Tensor, task: str) -> int:
    """Targets the loss sums over: next tokens (causal), examples (classification), target tokens (seq2seq)."""
    if task == "classification":
        return int(labels.numel())
    if task == "seq2seq":
        return int((labels != IGNORE_INDEX).sum())
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    logits = logits.float()  # the loss in fp32 even under bf16/fp16 autocast
    if task == "classification":
        return F.cross_entropy(logits, labels, reduction="sum")
    if task == "seq2seq":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if logits.dim() == 2:  # TargetPositionsOnly: one row per target, already in order
        return F.cross_entropy(logits, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX], reduction="sum")
    # Prompt tuning prepends virtual tokens: their logits come first and predict nothing of ours.
    logits = logits[:, -labels.shape[1] :]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def correct_count(logits: torch.Tensor, labels: torch.Tensor, task: str) -> int | None:
    """Right answers in the batch (classification only; None for generative tasks)."""
    if task != "classification":
        return None
    return int((logits.argmax(-1) == labels).sum())


class TargetPositionsOnly:
    """Run a causal LM's output head only where the next token is a target.

    In SFT the prompt (often half the tokens or more) and the padding carry no loss, yet a plain
    forward multiplies every position's hidden state by the [hidden x vocab] head and then
    softmaxes it. A forward pre-hook on the head keeps only the positions whose next token is
    labelled, so the model returns logits [targets, vocab] in the order of
    `labels[:, 1:][labels[:, 1:] != -100]`. The hook sits inside the model's own forward, so DDP
    and DeepSpeed see an ordinary forward. Outside `selecting(...)` the head sees everything.
    """

    def __init__(self, head: torch.nn.Module):
        self.mask = None
        head.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.mask is None:
            return None
        (hidden, *rest) = args
        if hidden.shape[:2] != self.mask.shape:  # e.g. soft-prompt positions in front: keep all
            return None
        return (hidden[self.mask], *rest)

    @contextmanager
    def selecting(self, labels: torch.Tensor):
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None
