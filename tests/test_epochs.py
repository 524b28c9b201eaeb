"""Training by epochs (`train.epochs`, `train.eval_every: epoch`) and a corpus's blank lines (the
`text` layout drops and counts them as empty rows, never rejects).

    python -m pytest -q tests/test_epochs.py
"""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import make_blocks, read_rejects, run_ingest, trainer_args

from pipeline.config import ConfigError, build_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the settings


def test_epochs_alone_replace_the_default_steps():
    cfg = build_config(None, ["train.epochs=3"])
    assert cfg.train.epochs == 3 and cfg.train.max_steps is None
    # And a YAML that sets max_steps (the quickstart's 200) trains by epochs once it is nulled.
    assert build_config(None, ["train.max_steps=200", "train.max_steps=null", "train.epochs=2"]).train.max_steps is None


@pytest.mark.parametrize("overrides, says", [
    (["train.max_steps=50", "train.epochs=2"], "train.epochs (2) and train.max_steps (50) are both set"),
    (["train.max_steps=null"], "train.max_steps is null: set it, or set train.epochs"),
    (["train.eval_every=epoch", "train.eval_every_steps=10"], "set one of them"),
    (["train.eval_every=step"], "train.eval_every"),
    (["train.epochs=0"], "train.epochs"),
])
def test_a_contradiction_fails_naming_the_keys(overrides, says):
    with pytest.raises(ConfigError, match="train") as e:
        build_config(None, overrides)
    assert says in str(e.value)


def test_early_stopping_may_validate_every_epoch():
    cfg = build_config(None, ["train.epochs=2", "train.eval_every=epoch", "train.early_stopping_patience=2"])
    assert cfg.train.validates and "train.eval_batches" not in cfg.inactive_keys()


@pytest.mark.parametrize("rows, micro, accum, world, epochs, steps, per_epoch", [
    (100, 8, 1, 2, 3, 21, 7),     # ceil(100 / 16) = 7 steps an epoch
    (100, 8, 1, 2, 0.5, 4, 7),    # half an epoch rounds up
    (64, 8, 1, 1, 2, 16, 8),
    (5, 8, 2, 1, 1, 1, 1),        # fewer rows than one global batch: one step an epoch
])
def test_epochs_become_steps_for_the_rows(rows, micro, accum, world, epochs, steps, per_epoch):
    cfg = build_config(None, [f"train.epochs={epochs}", "train.eval_every=epoch", f"train.micro_batch_size={micro}",
                              f"train.grad_accum_steps={accum}"])
    resolved = cfg.train.for_rows(rows, world)
    assert (resolved.max_steps, resolved.eval_every_steps) == (steps, per_epoch)
    assert cfg.train.max_steps is None  # the config itself is unchanged (and its fingerprint with it)


def test_steps_stay_steps():
    cfg = build_config(None, ["train.max_steps=30", "train.eval_every_steps=5"])
    assert cfg.train.for_rows(1000, 2) == cfg.train


# ---------------------------------------------------------------- the trainer


def test_the_trainer_runs_whole_epochs_and_validates_after_each(tmp_path):
    from pipeline.train import recipe

    tokenized = make_blocks(tmp_path / "tok", blocks=64)
    shutil.copytree(tokenized / "train", tokenized / "validation")
    args = trainer_args(tokenized, tmp_path, "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.max_steps=null",
                        "train.epochs=2", "train.eval_every=epoch", "train.micro_batch_size=8", "train.warmup_steps=2",
                        "train.save_every_steps=100", "train.eval_batches=2")
    assert recipe.main(args) == 0
    stats = json.loads((tmp_path / "out" / "train_stats.json").read_text())
    assert stats["steps"] == 16  # 64 rows / 8 per step = 8 steps an epoch, 2 epochs
    assert [v["step"] for v in stats["validations"]] == [8, 16]
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 16 and log[-1]["lr"] < log[2]["lr"]  # the cosine decays over the epochs' steps


# ---------------------------------------------------------------- a corpus's blank lines


def wikitext_like(path, texts):
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path)
    return path


def test_blank_rows_of_a_text_corpus_are_dropped_and_counted_not_rejected(tmp_path):
    texts = [" = Valkyria Chronicles = \n", "", " The game began development in 2010 .\n", "   \n", None, "", " It met with praise .\n"]
    stats, out = run_ingest(tmp_path, str(wikitext_like(tmp_path / "wiki.parquet", texts)), {"preprocess": {"template": "text"}},
                            text_column="text")
    assert (stats["rows_out"], stats["rows_empty"], stats["rows_rejected"], stats["rows_in"]) == (3, 4, 0, 7)
    assert read_rejects(out) == []
    kept = pq.read_table(next(out.glob("**/*.parquet")))["text"].to_pylist()
    assert kept == [texts[0], texts[2], texts[6]]


def test_a_corpus_of_only_blank_rows_says_so(tmp_path):
    from pipeline.data.ingest import IngestError

    with pytest.raises(IngestError, match="every input is empty .*3 rows with an empty text"):
        run_ingest(tmp_path, str(wikitext_like(tmp_path / "blank.parquet", ["", " ", None])), {"preprocess": {"template": "text"}},
                   text_column="text")


def test_blank_prompts_are_still_rejects_outside_the_text_layout(tmp_path):
    source = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["hi", "", "yo"], "response": ["a", "b", "c"]}), source)
    stats, out = run_ingest(tmp_path, str(source), max_reject_fraction=0.5)
    assert (stats["rows_out"], stats["rows_empty"], stats["rows_rejected"]) == (2, 0, 1)
    assert [r["reason"] for r in read_rejects(out)] == ["'prompt' is empty"]
