"""CUDA pulse tests: the same recipe on a GPU, bf16 autocast where the device supports it."""

from __future__ import annotations

import pytest
import torch
from test_trainer_golden import run_losses

from pipeline.config import TrainConfig
from pipeline.train import autocast_context

pytestmark = pytest.mark.gpu


def test_bf16_autocast_is_chosen_on_a_capable_gpu():
    context = autocast_context(TrainConfig(), torch.device("cuda", 0))
    if torch.cuda.is_bf16_supported():
        assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
    else:
        assert not isinstance(context, torch.autocast)


def test_training_on_cuda_learns(tmp_path, capsys):
    losses = run_losses(tmp_path)
    assert "device cuda:0" in capsys.readouterr().out
    assert losses[-1] < losses[0] - 0.3
