"""Leftovers of killed writers (pipeline/leftovers.py): the next writer removes them; a live
writer's folder, another host's, and a folder without a claim are never touched. Real processes,
killed with SIGKILL."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tiny import REPO

from pipeline import artifacts
from pipeline.artifacts import StageOutput
from pipeline.leftovers import make_private_folder, release

WRITER = """
import sys, time
from pathlib import Path
from pipeline.artifacts import StageOutput
out = StageOutput(sys.argv[1], "tokenize", "f" * 64)
path = out.prepare()
(path / "shard-0.bin").write_bytes(b"x" * 200_000)
print(path, flush=True)
time.sleep(120)
"""


def start_writer(root: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def killed_writer(parent: Path, prefix: str) -> Path:
    """A private folder with a file in it, made by a process then killed with SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                             "from pipeline.leftovers import make_private_folder\n"
                             "f = make_private_folder(Path(sys.argv[1]), sys.argv[2]); (f / 'model.safetensors').write_bytes(b'w' * 1000)\n"
                             "print(f, flush=True); time.sleep(120)", str(parent), prefix], cwd=REPO, stdout=subprocess.PIPE, text=True)
    half = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait()
    assert (half / "model.safetensors").exists()
    return half


def test_a_killed_stages_staging_folder_is_removed_by_the_next_run_and_a_live_ones_is_not(tmp_path, capsys):
    killed, killed_path = start_writer(tmp_path)
    live, live_path = start_writer(tmp_path)
    try:
        killed.kill()
        killed.wait()
        out = StageOutput(str(tmp_path), "tokenize", "e" * 64)
        mine = out.prepare()
        said = capsys.readouterr().out
        assert f"[tokenize] removed {killed_path}, left by a writer that was killed (0.2 MB)" in said
        assert not killed_path.exists() and not Path(f"{killed_path}.claim").exists()
        assert (live_path / "shard-0.bin").stat().st_size == 200_000  # its writer lives: untouched
        (mine / "rows.txt").write_text("3\n")
        out.commit({"rows": 3}, {})
    finally:
        live.kill()
        live.wait()
    # The committed output and the live (now dead) writer's folder with its claim; no claim of ours.
    names = sorted(p.name for p in (tmp_path / "tokenize").iterdir())
    assert names == sorted(["e" * 64, live_path.name, f"{live_path.name}.claim"])
    assert artifacts.verify(str(tmp_path / "tokenize" / ("e" * 64))) == []


def test_another_hosts_leftover_and_an_unclaimed_folder_are_left_alone(tmp_path):
    """On a shared file system this host may not see another host's locks: its claims are not ours to judge."""
    other = tmp_path / ".staging-0ther"
    other.mkdir()
    (other / "part").write_text("another host's run, maybe alive")
    Path(f"{other}.claim").write_text(f"not-{socket.gethostname()} 4242\n")
    unclaimed = tmp_path / ".staging-0ld"
    unclaimed.mkdir()  # made before claims existed, or by hand
    mine = make_private_folder(tmp_path, ".staging-")
    assert (other / "part").exists() and unclaimed.exists()
    release(mine)
    assert not mine.exists() and not Path(f"{mine}.claim").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging-0ld", ".staging-0ther", ".staging-0ther.claim"]


def test_a_killed_pull_into_the_local_cache_is_cleared_by_the_next_pull(tmp_path, monkeypatch):
    """The same for the registry's local copies: a puller killed half-way leaves `.copy-*`."""
    from pipeline.registry import local_copy

    parent = tmp_path / "cache" / "v1"
    half = killed_writer(parent, ".copy-")
    monkeypatch.setattr(local_copy, "version_cache", lambda registry, model, version: parent)
    monkeypatch.setattr(local_copy, "pull_version", lambda registry, model, version, dest: (dest / "manifest.json").write_text('{"files": {}}'))
    copy = local_copy.local_copy("reg", "m", "v1")
    assert copy == parent / "copy" and not half.exists()
    assert sorted(p.name for p in parent.iterdir()) == ["copy"]


def test_a_killed_publishers_copy_is_removed_by_the_next_publish_of_that_model(tmp_path):
    from pipeline.registry.store import publish_version

    model_folder = tmp_path / "registry" / "demo"
    half = killed_writer(model_folder, ".staging-v1-")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "weights.bin").write_bytes(b"w" * 1000)
    url, written = publish_version(bundle, str(tmp_path / "registry"), "demo", "v2", {"run": "2"})
    assert written and not half.exists()
    assert sorted(p.name for p in model_folder.iterdir()) == ["v2"]
