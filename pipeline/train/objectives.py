"""What each task optimises: which batch fields go into the model, and the summed loss.

The trainer normalises by the target count of the whole global step (see step.train_step), so these
return sums, never means: a mean per micro-batch would weigh short and long batches alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class Targets:
    """Where a causal LM's loss looks, worked out from the labels on the host before the batch goes
    to the device: a boolean mask applied on a GPU makes the host wait for the GPU to learn the
    result's size, once per micro-batch."""

    index: torch.Tensor
    """Flat positions (row x length + column) whose next token is labelled, row-major."""
    tokens: torch.Tensor
    """Those next tokens, in the same order."""
    rows: torch.Tensor
    """The row of each."""
    shape: tuple[int, int]
    """[rows, length] of the batch."""

    @classmethod
    def of(cls, labels: torch.Tensor) -> "Targets":
        labelled = torch.zeros_like(labels, dtype=torch.bool)
        labelled[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        index = labelled.flatten().nonzero().squeeze(1)
        return cls(index, labels.flatten()[index + 1], index // labels.shape[1], tuple(labels.shape))

    def to(self, device: torch.device) -> "Targets":
        move = lambda t: to_device(t, device)  # noqa: E731
        return Targets(move(self.index), move(self.tokens), move(self.rows), self.shape)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to GPU without waiting: from pinned memory, the copy overlaps the GPU's queued work."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class Batch:
    """One batch on the device, split into what the model reads and what the loss reads."""

    inputs: dict[str, torch.Tensor]
    """Keyword arguments for the model."""
    labels: torch.Tensor
    targets: Targets | None
    """Causal LM and preference: the labelled next tokens (None for the other tasks)."""
    reference: torch.Tensor | None
    """Preference: the reference model's log-probability of each row."""
    count: int
    """Targets the loss sums over (target_count)."""


def split_batch(batch: dict[str, torch.Tensor], task: str, device: torch.device) -> Batch:
    """A loader's batch (host tensors) as a `Batch` on `device`; everything the loss needs to know
    about the labels is computed here, on the host."""
    batch = dict(batch)
    reference = batch.pop("reference_logps", None)
    labels = batch["labels"]
    targets = Targets.of(labels).to(device) if task in ("causal_lm", "preference") else None
    count = target_count(labels, task)
    inputs, labels = model_inputs({k: to_device(v, device) for k, v in batch.items()}, task)
    return Batch(inputs, labels, targets, reference, count)


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


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str, targets: Targets | None = None) -> torch.Tensor:
    logits = logits.float()  # the loss in fp32 even under bf16/fp16 autocast
    if task == "classification":
        return F.cross_entropy(logits, labels, reduction="sum")
    if task == "seq2seq":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if logits.dim() == 2:  # TargetPositionsOnly: one row per target, already in order
        targets = targets or Targets.of(labels)
        return F.cross_entropy(logits, targets.tokens, reduction="sum")
    # Prompt tuning prepends virtual tokens: their logits come first and predict nothing of ours.
    logits = logits[:, -labels.shape[1] :]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def correct_count(logits: torch.Tensor, labels: torch.Tensor, task: str) -> int | None:
    """Right answers in the batch (classification only; None for generative tasks)."""
    if task != "classification":
        return None
    return int((logits.argmax(-1) == labels).sum())


class TargetPositionsOnly:
    """Run a causal LM's output head only where the next token is a target, or (fused) not at all.

    In SFT the prompt (often half the tokens or more) and the padding carry no loss, yet a plain
    forward multiplies every position's hidden state by the [hidden x vocab] head and then
    softmaxes it. A forward pre-hook on the head keeps only the positions whose next token is
    labelled, so the model returns logits [targets, vocab] in the order of `Targets.tokens`.
    The hook sits inside the model's own forward, so DDP and DeepSpeed see an ordinary forward.

    `fused`: inside `selecting`, the head hands back its (selected) input instead of logits, and
    `token_losses` applies the head and the cross-entropy together in chunks (train/fused_loss.py):
    the [targets x vocab] fp32 logits of the whole micro-batch never exist. Outside `selecting(...)`
    the head is the plain head over every position (validation, generation).
    """

    def __init__(self, head: torch.nn.Module, fused: bool = False, onednn: bool = False):
        self.head, self.fused, self.onednn = head, fused, onednn
        self.index: torch.Tensor | None = None
        self.shape: tuple[int, int] | None = None
        self.bypass = False
        head.register_forward_pre_hook(self._select)
        if fused:
            plain = head.forward
            # An instance attribute, so the module (its weights, its name in checkpoints) is unchanged.
            head.forward = lambda hidden, *args, **kwargs: hidden if self.bypass else plain(hidden, *args, **kwargs)

    def _select(self, module, args):
        if self.index is None:
            return None
        (hidden, *rest) = args
        if tuple(hidden.shape[:2]) != self.shape:  # e.g. soft-prompt positions in front: keep all
            return None
        return (hidden.flatten(0, 1).index_select(0, self.index), *rest)

    @contextmanager
    def selecting(self, labels_or_targets: "torch.Tensor | Targets"):
        """Within: the head sees the target positions only (given as a batch's `Targets`, or labels)."""
        targets = labels_or_targets if isinstance(labels_or_targets, Targets) else Targets.of(labels_or_targets)
        self.index, self.shape, self.bypass = targets.index, targets.shape, self.fused
        try:
            yield
        finally:
            self.index, self.shape, self.bypass = None, None, False

    def token_losses(self, hidden: torch.Tensor, targets: Targets, reduction: str) -> torch.Tensor:
        """Fused: the cross-entropy of the head over `hidden` (the selected positions) against the targets."""
        from pipeline.train.fused_loss import linear_cross_entropy

        # ignore_index=None: the targets are the labelled positions only, never -100.
        return linear_cross_entropy(hidden, self.head.weight, targets.tokens, bias=getattr(self.head, "bias", None),
                                    reduction=reduction, ignore_index=None, onednn=self.onednn)


# ---------------------------------------------------------------- preference (DPO)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, targets: Targets | None = None,
                   head: TargetPositionsOnly | None = None) -> torch.Tensor:
    """Each row's summed log-probability of its labelled next tokens, float32 [rows].

    `logits` are [rows, length, vocab] (a soft prompt's positions may come first), or
    TargetPositionsOnly's [targets, vocab] in the row-major order of the labelled positions, or
    with a fused `head`, its selected hidden states [targets, hidden]."""
    if logits.dim() == 2:
        targets = targets or Targets.of(labels)
        if head is not None and head.fused:
            token = -head.token_losses(logits, targets, "none")
        else:
            token = -F.cross_entropy(logits.float(), targets.tokens, reduction="none")
        return torch.zeros(labels.shape[0], dtype=token.dtype, device=token.device).index_add(0, targets.rows, token)
    later = labels[:, 1:]
    logits = logits[:, -labels.shape[1] :][:, :-1].float()
    token = -F.cross_entropy(logits.flatten(0, 1), later.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return token.view(later.shape).sum(-1)  # ignored positions are 0


def preference_loss(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, beta: float,
                    targets: Targets | None = None, head: TargetPositionsOnly | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss summed over the batch's n pairs (rows: n chosen, then n rejected), and
    the sums [chosen reward, rejected reward, pairs ranked right] for the log (detached, float64).

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) per pair (Rafailov et al. 2023,
    TRL's `sigmoid` loss); reward = beta * (pi - ref). Where policy equals reference it is ln 2."""
    policy = sequence_logps(logits, labels, targets, head)
    n = labels.shape[0] // 2
    ratios = policy - to_device(reference, policy.device).to(policy.dtype)
    chosen, rejected = beta * ratios[:n], beta * ratios[n:]
    loss = -F.logsigmoid(chosen - rejected).sum()
    with torch.no_grad():  # left on the device: the trainer reads them with the loss, every log_every_steps
        sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum().to(chosen.dtype)]).double()
    return loss, sums


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
"""TRL's names for DPO's log metrics."""


def batch_loss(output: torch.Tensor, batch: Batch, task: str, beta: float,
               head: TargetPositionsOnly | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed loss of a batch, and for preference the reward sums of `preference_loss`.

    `output` is the model's `.logits`: logits, or under a fused `head` (inside its `selecting`)
    the hidden states of the target positions."""
    fused = head if head is not None and head.fused and output.dim() == 2 else None
    if task == "preference":
        return preference_loss(output, batch.labels, batch.reference, beta, batch.targets, fused)
    if fused is not None:
        return fused.token_losses(output, batch.targets, "sum"), None
    return summed_loss(output, batch.labels, task, batch.targets), None


def reward_metrics(sums: torch.Tensor | list[float], pairs: float) -> dict[str, float]:
    """Means over `pairs` from preference_loss's summed [chosen, rejected, ranked right]."""
    chosen, rejected, right = (float(v) / max(1.0, pairs) for v in sums)
    return dict(zip(REWARD_KEYS, (chosen, rejected, chosen - rejected, right)))
