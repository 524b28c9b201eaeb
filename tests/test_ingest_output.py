"""Ingest's output: byte-identical shards on a rerun, content fingerprints that follow the
bytes, the commit through the stage runner, and no pandas on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tiny import REPO, csv_text, make_config, run_ingest, shard_bytes

from pipeline import stages
from pipeline.data import ingest, sources


# ---------------------------------------------------------------- the stage as a whole


def test_reading_text_never_imports_pandas(tmp_path):
    # pyarrow's Python <-> arrow conversions import pandas on first use: a third of a second per
    # run, as long as ingesting a 300 MB file. Rejects of every kind take those paths.
    (tmp_path / "a.csv").write_bytes(b'prompt,response\nq,a\nbad\n,x\ny,caf\xe9\nz,nul\x00\n\n"m\nl",r\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "q", "response": 1}\n{"prompt": ""}\n[1]\n')
    pq.write_table(pa.table({"prompt": ["q", None], "response": pa.array([b"a", b"\xff"]), "n": [[1], [2]]}),
                   tmp_path / "c.parquet")
    code = (
        "import sys; from pathlib import Path; from pipeline.data import ingest; from pipeline.config import build_config\n"
        f"cfg = build_config({{'data': {{'source': {str(tmp_path / '*.*')!r}, 'max_reject_fraction': 1.0}}}})\n"
        f"stats = ingest.run(cfg.data, cfg.row_spec, inputs={{}}, out=Path({str(tmp_path / 'out')!r}), scratch=Path('.'))\n"
        "print(stats['rows_out'], stats['rows_rejected'], 'pandas' in sys.modules)\n"
    )
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", "7", "False"]


def test_same_input_gives_byte_identical_shards(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([[f"q{i}", f"a{i}\nline two"] for i in range(1000)] + [["", "x"]]))

    stats1, out1 = run_ingest(tmp_path / "one", str(path), shard_rows=300)
    stats2, out2 = run_ingest(tmp_path / "two", str(path), shard_rows=300)

    shards1 = sorted((out1 / "shards").iterdir())
    assert [p.name for p in shards1] == [f"part-00000-0000{i}.parquet" for i in range(4)]
    assert [pq.ParquetFile(p).metadata.num_rows for p in shards1] == [300, 300, 300, 100]
    assert shard_bytes(out1) == shard_bytes(out2)
    assert (out1 / "rejects.jsonl").read_bytes() == (out2 / "rejects.jsonl").read_bytes()
    assert stats1 == stats2 and stats1["shards"] == 4


def test_content_fingerprint_follows_the_bytes(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["hello", "world"]]))
    cfg = make_config(str(path))

    before = ingest.content_fingerprint(cfg.data, cfg.row_spec)
    path.write_text(csv_text([["hellO", "world"]]))  # same size, one byte differs
    after = ingest.content_fingerprint(cfg.data, cfg.row_spec)

    assert before[0]["bytes"] == after[0]["bytes"] == path.stat().st_size
    assert before[0]["sha256"] != after[0]["sha256"]
    assert before[0]["path"] == after[0]["path"]


def test_fingerprint_hashes_an_unchanged_file_once(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["hello", "world"]]))
    old = time.time() - 60
    os.utime(path, (old, old))  # a freshly written file is never cached (racy mtime)
    calls = []
    monkeypatch.setattr(sources, "sha256_file", lambda *a: calls.append(a) or "digest")
    cfg = make_config(str(path))

    assert ingest.content_fingerprint(cfg.data, cfg.row_spec) == ingest.content_fingerprint(cfg.data, cfg.row_spec)
    assert len(calls) == 1


def test_runner_commits_a_manifest_with_the_stats(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["q", "a"], ["", "a"]]))
    cfg = make_config(str(path), max_reject_fraction=0.5)

    result = stages.materialize("ingest", cfg, {}, workdir=str(tmp_path / "runs"), log=lambda _: None)

    manifest = json.loads((Path(result.output) / "manifest.json").read_text())
    assert result.status == "ran"
    assert manifest["stats"]["rows_out"] == 1 and manifest["stats"]["rows_rejected"] == 1
    assert set(manifest["files"]) == {"rejects.jsonl", "shards/part-00000-00000.parquet"}
    again = stages.materialize("ingest", cfg, {}, workdir=str(tmp_path / "runs"), log=lambda _: None)
    assert (again.status, again.fingerprint) == ("cached", result.fingerprint)
