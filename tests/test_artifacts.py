"""Stage outputs: the commit protocol, verification, fingerprints; locally, in memory:// and on S3."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import fsspec
import pytest
from tiny import write_tree

from pipeline import artifacts, stages
from pipeline.artifacts import MANIFEST, Artifact, StageOutput
from pipeline.config import build_config

FILES = {"a.txt": b"alpha\n", "sub/b.bin": bytes(range(256)), "sub/deeper/c.json": b'{"c": 3}'}


def commit_local(root: Path, fp: str = "fp1") -> Artifact:
    out = StageOutput(str(root), "demo", fp)
    write_tree(out.prepare(), FILES)
    return out.commit({"rows": 3}, {"config": {"demo": {"x": 1}}, "parents": {}})


def tiny_ingest_config(tmp_path: Path, rows: int = 5):
    source = tmp_path / "tiny.csv"
    source.write_text("prompt,response\n" + "".join(f"q{i},a{i}\n" for i in range(rows)))
    return build_config({"data": {"source": str(source)}})


def quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- commit and verify


def test_commit_writes_a_manifest_with_every_sha256_and_the_stats(tmp_path):
    artifact = commit_local(tmp_path)

    folder = tmp_path / "demo" / "fp1"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert artifact == Artifact("demo", "fp1", str(folder), {"rows": 3})
    assert manifest["files"] == {  # the modification time: the fast path of the check before reuse
        rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "mtime_ns": (folder / rel).stat().st_mtime_ns}
        for rel, data in FILES.items()
    }
    assert (manifest["stage"], manifest["fingerprint"], manifest["stats"]) == ("demo", "fp1", {"rows": 3})
    assert manifest["config"] == {"demo": {"x": 1}}
    assert not (folder / (MANIFEST + ".tmp")).exists()
    assert artifacts.load_committed(str(folder)) == artifact


def test_a_nested_file_named_like_the_manifest_is_content(tmp_path):
    out = StageOutput(str(tmp_path), "demo", "fp1")
    write_tree(out.prepare(), {"model/manifest.json": b"{}", "a.txt": b"a"})
    artifact = out.commit({}, {})

    assert set(json.loads((Path(artifact.url) / MANIFEST).read_text())["files"]) == {"a.txt", "model/manifest.json"}
    (Path(artifact.url) / "model" / "manifest.json").write_bytes(b"{ }")
    assert artifacts.verify(artifact.url) == ["model/manifest.json: sha256 mismatch"]


def test_verify_a_good_folder(tmp_path):
    assert artifacts.verify(commit_local(tmp_path).url) == []


def test_verify_names_a_modified_byte(tmp_path):
    folder = Path(commit_local(tmp_path).url)
    data = bytearray(FILES["sub/b.bin"])
    data[100] ^= 1
    (folder / "sub" / "b.bin").write_bytes(bytes(data))
    assert artifacts.verify(str(folder)) == ["sub/b.bin: sha256 mismatch"]


def test_verify_names_a_missing_file(tmp_path):
    folder = Path(commit_local(tmp_path).url)
    (folder / "sub" / "deeper" / "c.json").unlink()
    assert artifacts.verify(str(folder)) == ["sub/deeper/c.json: missing"]


def test_verify_names_an_extra_file(tmp_path):
    folder = Path(commit_local(tmp_path).url)
    (folder / "sub" / "stray.txt").write_text("not committed")
    assert artifacts.verify(str(folder)) == ["sub/stray.txt: not in manifest"]


def test_verify_and_load_refuse_an_uncommitted_folder(tmp_path):
    out = StageOutput(str(tmp_path), "demo", "fp1")
    write_tree(out.prepare(), FILES)

    assert artifacts.load_committed(out.url) is None
    assert out.committed() is None
    [problem] = artifacts.verify(out.url)
    assert "not committed" in problem


def test_a_live_runs_staging_folder_is_left_alone(tmp_path):
    """A writer that has not committed yet (here: in this process, so surely alive). A killed
    writer's folder is removed by the next one: tests/test_leftovers.py."""
    live = StageOutput(str(tmp_path), "demo", "fp1")
    write_tree(live.prepare(), FILES)
    again = StageOutput(str(tmp_path), "demo", "fp1")
    assert again.prepare() != live.path  # a staging folder of its own
    write_tree(again.path, FILES)
    artifact = again.commit({"rows": 3}, {})

    assert artifact.url == str(tmp_path / "demo" / "fp1") and artifacts.verify(artifact.url) == []
    assert sorted(p.relative_to(live.path).as_posix() for p in live.path.rglob("*") if p.is_file()) == sorted(FILES)
    assert not again.path.exists()  # its own staging became the output


def test_a_folder_without_a_manifest_at_the_outputs_place_is_refused_not_deleted(tmp_path):
    cfg = tiny_ingest_config(tmp_path)
    workdir = tmp_path / "runs"
    fp = stages.compute_fingerprint("ingest", cfg, {})
    squatter = workdir / "ingest" / fp
    squatter.mkdir(parents=True)
    (squatter / "junk").write_text("made by hand, or by an older tunepipe")

    with pytest.raises(artifacts.ArtifactError, match=f"{squatter} exists but holds no manifest.json.*Nothing was deleted"):
        stages.materialize("ingest", cfg, {}, str(workdir), log=quiet)
    assert (squatter / "junk").read_text() == "made by hand, or by an older tunepipe"
    assert [p.name for p in (workdir / "ingest").iterdir()] == [fp]  # its own staging folder went away


def test_two_runs_committing_one_output_at_once_leave_one_whole_output(tmp_path):
    first, second = StageOutput(str(tmp_path), "demo", "fp1"), StageOutput(str(tmp_path), "demo", "fp1")
    write_tree(first.prepare(), FILES)
    write_tree(second.prepare(), {**FILES, "a.txt": b"second"})
    won = first.commit({"by": "first"}, {})
    lost = second.commit({"by": "second"}, {})

    assert won == lost == artifacts.load_committed(str(tmp_path / "demo" / "fp1"))
    assert won.stats == {"by": "first"} and (tmp_path / "demo" / "fp1" / "a.txt").read_bytes() == FILES["a.txt"]
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["fp1"]  # the loser removed only its own staging


def test_remote_commit_uploads_then_creates_the_manifest_and_leaves_no_staging(tmp_path, monkeypatch):
    """memory:// stands in for an object store: no rename, so the files go to an upload folder of
    their own and the manifest naming it is created last, only if none exists."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    root = f"memory://tunepipe-{uuid.uuid4().hex}/work"
    fs = fsspec.filesystem("memory")
    order = []
    put_file, pipe_file = fs.put_file, fs.pipe_file
    monkeypatch.setattr(fs, "put_file", lambda lpath, rpath, **kw: order.append(rpath) or put_file(lpath, rpath, **kw))
    monkeypatch.setattr(fs, "pipe_file", lambda path, value, **kw: order.append((path, kw.get("mode"))) or pipe_file(path, value, **kw))

    assert StageOutput(root, "demo", "fp1").committed() is None
    assert list((tmp_path / "tmp").iterdir()) == []  # checking for a cached output stages nothing
    out = StageOutput(root, "demo", "fp1")
    write_tree(out.prepare(), FILES)
    artifact = out.commit({"rows": 3}, {})

    manifest = json.loads(fs.cat_file(f"{artifact.url}/{MANIFEST}"))
    uploads = [p.rsplit("/fp1/", 1)[1] for p in order[:-1]]
    assert uploads == [f"{manifest['root']}/{rel}" for rel in sorted(FILES)]
    assert order[-1] == (artifact.url.replace("memory://", "/") + f"/{MANIFEST}", "create")
    assert artifacts.verify(artifact.url) == []
    assert list((tmp_path / "tmp").iterdir()) == []  # the staging folder is gone after the upload

    late = StageOutput(root, "demo", "fp1")  # a second writer of the same output: it loses, cleanly
    write_tree(late.prepare(), {**FILES, "a.txt": b"late"})
    assert late.commit({"rows": 4}, {}).stats == {"rows": 3}
    assert fs.find(artifact.url.replace("memory://", "/")) == sorted([f"{artifact.url.replace('memory://', '/')}/{MANIFEST}",
        *(f"{artifact.url.replace('memory://', '/')}/{manifest['root']}/{rel}" for rel in FILES)])


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_follows_config_parents_code_and_content():
    base = artifacts.fingerprint("sample", {"sample": {"seed": 0}}, {"ingest": "aaa"}, "code1", None)
    assert base == artifacts.fingerprint("sample", {"sample": {"seed": 0}}, {"ingest": "aaa"}, "code1", None)
    variants = [
        artifacts.fingerprint("sample", {"sample": {"seed": 1}}, {"ingest": "aaa"}, "code1", None),
        artifacts.fingerprint("sample", {"sample": {"seed": 0}}, {"ingest": "aab"}, "code1", None),
        artifacts.fingerprint("sample", {"sample": {"seed": 0}}, {"ingest": "aaa"}, "code2", None),
        artifacts.fingerprint("sample", {"sample": {"seed": 0}}, {"ingest": "aaa"}, "code1", [{"sha256": "x"}]),
        artifacts.fingerprint("preprocess", {"sample": {"seed": 0}}, {"ingest": "aaa"}, "code1", None),
    ]
    assert len({base, *variants}) == 6


def test_stage_fingerprint_follows_config_parent_and_data(tmp_path):
    cfg = tiny_ingest_config(tmp_path)
    ingest_fp = stages.compute_fingerprint("ingest", cfg, {})
    assert stages.compute_fingerprint("ingest", cfg, {}) == ingest_fp
    assert stages.compute_fingerprint("ingest", build_config({"data": {**cfg.data.model_dump(), "shard_rows": 2}}), {}) != ingest_fp
    (tmp_path / "tiny.csv").write_text((tmp_path / "tiny.csv").read_text().replace("q0", "Q0"))  # same size
    assert stages.compute_fingerprint("ingest", cfg, {}) != ingest_fp

    parent = {"ingest": Artifact("ingest", "aaa", "/x")}
    sample_fp = stages.compute_fingerprint("sample", cfg, parent)
    assert stages.compute_fingerprint("sample", cfg, {"ingest": Artifact("ingest", "aab", "/x")}) != sample_fp
    assert stages.compute_fingerprint("sample", build_config({}, ["sample.seed=1"]), parent) != sample_fp
    assert stages.compute_fingerprint("sample", build_config({}, ["data.shard_rows=2"]), parent) == sample_fp  # not its section


# ---------------------------------------------------------------- S3


@pytest.mark.integration
def test_s3_commit_verify_and_download(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path / "cache"))
    root = f"s3://{s3_bucket}/work"
    out = StageOutput(root, "demo", "fp1")
    assert out.committed() is None
    write_tree(out.prepare(), FILES)
    artifact = out.commit({"rows": 3}, {})

    assert artifact.url == f"s3://{s3_bucket}/work/demo/fp1"
    assert artifacts.verify(artifact.url) == []
    assert artifacts.load_committed(artifact.url) == artifact
    local = artifact.local_path()
    assert local == tmp_path / "cache" / "artifacts" / "demo" / "fp1"
    assert {rel: (local / rel).read_bytes() for rel in FILES} == FILES
    assert artifacts.verify(str(local)) == []

    fs = fsspec.filesystem("s3")
    fs.pipe_file(artifacts.file_url(artifact.url, "a.txt"), b"alphA\n")
    fs.rm_file(artifacts.file_url(artifact.url, "sub/deeper/c.json"))
    fs.pipe_file(artifacts.file_url(artifact.url, "extra.txt"), b"x")  # among its files
    assert artifacts.verify(artifact.url) == ["a.txt: sha256 mismatch", "sub/deeper/c.json: missing", "extra.txt: not in manifest"]
    assert artifact.local_path() == local  # the verified download is reused
    assert (local / "a.txt").read_bytes() == b"alpha\n"


@pytest.mark.integration
def test_s3_download_refuses_a_corrupt_file(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path / "cache"))
    out = StageOutput(f"s3://{s3_bucket}/work", "demo", "fp1")
    write_tree(out.prepare(), FILES)
    artifact = out.commit({}, {})
    fsspec.filesystem("s3").pipe_file(artifacts.file_url(artifact.url, "sub/b.bin"), b"corrupt")

    with pytest.raises(artifacts.ArtifactError, match="sub/b.bin: sha256 does not match"):
        artifact.local_path()
    assert not (tmp_path / "cache" / "artifacts" / "demo" / "fp1" / MANIFEST).exists()


@pytest.mark.integration
@pytest.mark.parametrize("hostile", ["../../../../escaped.bin", "/tmp/escaped-abs.bin", "sub/../../escaped.bin"])
def test_s3_download_refuses_a_manifest_path_outside_the_cache(tmp_path, s3_bucket, monkeypatch, hostile):
    """A manifest on shared storage is written by whoever can write there: its names must not
    place files outside the local cache folder."""
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path / "a" / "b" / "cache"))
    out = StageOutput(f"s3://{s3_bucket}/work", "demo", "fp1")
    write_tree(out.prepare(), FILES)
    artifact = out.commit({}, {})
    s3 = fsspec.filesystem("s3")
    manifest = json.loads(s3.cat_file(f"{s3_bucket}/work/demo/fp1/{MANIFEST}"))
    manifest["files"] = {hostile: manifest["files"]["a.txt"]}
    s3.pipe_file(f"{s3_bucket}/work/demo/fp1/{MANIFEST}", json.dumps(manifest).encode())

    with pytest.raises(artifacts.ArtifactError, match="unsafe path"):
        artifact.local_path()
    assert not list(tmp_path.rglob("escaped*")) and not Path("/tmp/escaped-abs.bin").exists()


@pytest.mark.integration
def test_s3_workdir_gives_the_same_bytes_as_a_local_one(tmp_path, s3_bucket):
    cfg = tiny_ingest_config(tmp_path, rows=50)
    local = stages.materialize("ingest", cfg, {}, str(tmp_path / "runs"), log=quiet)
    remote = stages.materialize("ingest", cfg, {}, f"s3://{s3_bucket}/work", log=quiet)

    assert remote.status == "ran" and remote.fingerprint == local.fingerprint
    assert remote.output == f"s3://{s3_bucket}/work/ingest/{local.fingerprint}"
    assert artifacts.verify(remote.output) == []
    fs = fsspec.filesystem("s3")
    shard = "shards/part-00000-00000.parquet"
    assert fs.cat_file(artifacts.file_url(remote.output, shard)) == (Path(local.output) / shard).read_bytes()
    assert fs.cat_file(artifacts.file_url(remote.output, "rejects.jsonl")) == (Path(local.output) / "rejects.jsonl").read_bytes()
    assert remote.stats == local.stats and remote.stats["rows_out"] == 50

    again = stages.materialize("ingest", cfg, {}, f"s3://{s3_bucket}/work", log=quiet)
    assert (again.status, again.fingerprint) == ("cached", local.fingerprint)


def test_a_source_file_changed_during_the_run_is_not_committed(tmp_path, monkeypatch):
    from pipeline.data import ingest

    source = tmp_path / "pairs.csv"
    source.write_text("prompt,response\nq,a\n")
    cfg = build_config({"data": {"source": str(source)}})
    real_run = ingest.run

    def run_then_edit(*args, **kwargs):
        stats = real_run(*args, **kwargs)
        source.write_text("prompt,response\nq,a\nq2,a2\n")  # e.g. an export still being written
        return stats

    monkeypatch.setattr(ingest, "run", run_then_edit)
    with pytest.raises(stages.StageInputsChanged):
        stages.materialize("ingest", cfg, {}, str(tmp_path / "runs"), log=lambda _: None)
    assert not list((tmp_path / "runs").rglob("manifest.json"))
