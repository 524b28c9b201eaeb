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
    """Targets the loss sums over: next tokens (causal), examples (classification), target tokens
    (seq2seq), pairs (preference: a batch of n pairs is 2n rows)."""
    if task == "classification":
        return int(labels.numel())
    if task == "preference":
        return labels.shape[0] // 2
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


# ---------------------------------------------------------------- preference (DPO)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its labelled next tokens, float32 [rows].

    `logits` are [rows, length, vocab] (a soft prompt's positions may come first), or
    TargetPositionsOnly's [targets, vocab] in the row-major order of the labelled positions."""
    targets = labels[:, 1:]
    learned = targets != IGNORE_INDEX
    if logits.dim() == 2:
        token = -F.cross_entropy(logits.float(), targets[learned], reduction="none")
        rows = learned.nonzero()[:, 0]
        return torch.zeros(labels.shape[0], dtype=token.dtype, device=token.device).index_add(0, rows, token)
    logits = logits[:, -labels.shape[1] :][:, :-1].float()
    token = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return token.view(targets.shape).sum(-1)  # ignored positions are 0


def preference_loss(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss summed over the batch's n pairs (rows: n chosen, then n rejected), and
    the sums [chosen reward, rejected reward, pairs ranked right] for the log (detached, float64).

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) per pair (Rafailov et al. 2023,
    TRL's `sigmoid` loss); reward = beta * (pi - ref). Where policy equals reference it is ln 2."""
    policy = sequence_logps(logits, labels)
    n = labels.shape[0] // 2
    ratios = policy - reference.to(policy.device, policy.dtype)
    chosen, rejected = beta * ratios[:n], beta * ratios[n:]
    loss = -F.logsigmoid(chosen - rejected).sum()
    with torch.no_grad():
        sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum().to(chosen.dtype)]).double().cpu()
    return loss, sums


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
"""TRL's names for DPO's log metrics."""


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, task: str, reference: torch.Tensor | None, beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed loss of a batch, and for preference the reward sums of `preference_loss`."""
    if task == "preference":
        return preference_loss(logits, labels, reference, beta)
    return summed_loss(logits, labels, task), None


def reward_metrics(sums: torch.Tensor | list[float], pairs: float) -> dict[str, float]:
    """Means over `pairs` from preference_loss's summed [chosen, rejected, ranked right]."""
    chosen, rejected, right = (float(v) / max(1.0, pairs) for v in sums)
    return dict(zip(REWARD_KEYS, (chosen, rejected, chosen - rejected, right)))
