"""Many adapters, one base: two LoRA adapters trained on two datasets from the same base are
published as adapter files only, then served together from one process (examples/two_adapters.py)."""

from __future__ import annotations

import json

import pytest
from tiny import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # two pipelines to publish, then serving


def test_two_adapters_published_small_and_served_from_one_base(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import two_adapters

    assert two_adapters.main(["--workdir", str(tmp_path), "--steps", "12"]) == 0
    printed = capsys.readouterr().out
    pulled = {name: tmp_path / "pulled" / name for name in ("support-answers", "stdlib-docs")}
    base_bytes = (tmp_path / "base" / "model.safetensors").stat().st_size
    for name, folder in pulled.items():
        files = sorted(p.name for p in (folder / "model").iterdir())
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files, files
        assert (folder / "model" / "adapter_model.safetensors").stat().st_size < base_bytes / 10
        lineage = json.loads((folder / "lineage.json").read_text())
        assert lineage["train"]["config"]["train"]["method"] == "lora"
        assert f"{name}: published adapter" in printed

    # Both adapters on one base, one process: each answers, and they answer differently.
    prompts = ["### Question:\nHow long is the warranty?\n### Answer:\n", "Return the"]
    answers = two_adapters.answer_with_each(str(tmp_path / "base"), pulled, prompts, max_new_tokens=12)
    assert set(answers) == set(pulled)
    assert all(len(a) == 2 for a in answers.values())
    assert answers["support-answers"] != answers["stdlib-docs"]
