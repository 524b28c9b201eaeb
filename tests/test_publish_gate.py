"""The evaluation gate: a model that misses `evaluate.max_perplexity` is never published."""

from __future__ import annotations

import pytest
from tiny import QUICKSTART, REPO, tiny_overrides

from pipeline import stages
from pipeline.config import load_config
from pipeline.registry.publish import GateFailed

pytestmark = pytest.mark.integration


def test_gate_refuses_to_publish_and_keeps_the_evaluation(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    registry = tmp_path / "registry"
    cfg = load_config(QUICKSTART, tiny_overrides(registry, **{"train.max_steps": 2, "evaluate.max_perplexity": 1.0001}))
    with pytest.raises(stages.StageFailed, match="publish stage failed: .*max_perplexity") as failed:
        stages.run_stages(cfg, str(tmp_path / "runs"), log=lambda _: None)
    assert isinstance(failed.value.error, GateFailed) and [r.name for r in failed.value.done][-1] == "evaluate"
    assert not registry.exists() or not any(registry.rglob("manifest.json"))
    # Everything before publish is committed, so loosening the gate only re-evaluates and publishes.
    looser = load_config(QUICKSTART, tiny_overrides(registry, **{"train.max_steps": 2, "evaluate.max_perplexity": 1e9}))
    results = {r.name: r.status for r in stages.run_stages(looser, str(tmp_path / "runs"), log=lambda _: None)}
    assert results["train"] == "cached" and results["evaluate"] == "ran" and results["publish"] == "ran"
    assert len(list(registry.glob("tiny/*/manifest.json"))) == 1
    # The gate-passing publish moved `latest` to its version; a refused one moved nothing.
    from pipeline.registry import aliases

    [version] = [p.parent.name for p in registry.glob("tiny/*/manifest.json")]
    assert [(m.version, m.previous, m.reason) for m in aliases.history(str(registry), "tiny", "latest")] == [(version, None, "publish")]
    # A second publish of another model version moves it on; the first version keeps existing.
    retrained = load_config(QUICKSTART, tiny_overrides(registry, **{"train.max_steps": 3, "evaluate.max_perplexity": 1e9}))
    second = {r.name: r for r in stages.run_stages(retrained, str(tmp_path / "runs"), log=lambda _: None)}["publish"]
    assert aliases.target(str(registry), "tiny", "latest") == second.stats["version"] != version
    assert [m.previous for m in aliases.history(str(registry), "tiny", "latest")] == [None, version]
