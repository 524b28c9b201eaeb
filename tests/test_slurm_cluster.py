"""The test Slurm cluster itself (tests/slurm_cluster.py): a real slurmctld and two slurmd on
loopback. A two-node batch job gets one task on each node, its node list names both, a failing
script ends FAILED, and the job sees the submitter's environment (sbatch's default export),
which is how code under test finds this cluster through SLURM_CONF."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def submit(cluster, name: str, script: str, *options: str, env: dict[str, str] | None = None) -> tuple[str, Path]:
    """Submits `script` on two nodes; returns the job id and the file its output goes to."""
    output = cluster.root / f"{name}.out"
    command = ["sbatch", "-N", "2", "--parsable", f"--job-name={name}", f"--output={output}", *options, "--wrap", script]
    result = subprocess.run(command, env=env or cluster.env, cwd=cluster.root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0], output


def test_a_two_node_job_runs_one_srun_task_on_each_node(slurm_cluster):
    job, output = submit(slurm_cluster, "two_tasks", "srun printenv SLURMD_NODENAME")
    assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED", output.read_text()
    assert sorted(output.read_text().split()) == ["n1", "n2"] == slurm_cluster.nodes


def test_the_job_node_list_names_both_nodes(slurm_cluster):
    job, output = submit(slurm_cluster, "node_list", 'scontrol show hostnames "$SLURM_JOB_NODELIST"')
    assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED", output.read_text()
    assert output.read_text().split() == ["n1", "n2"]


def test_a_failing_script_ends_failed_with_its_exit_code(slurm_cluster):
    job, output = submit(slurm_cluster, "exit_3", "exit 3")
    assert slurm_cluster.wait_job(job, timeout=60) == "FAILED", output.read_text()
    shown = slurm_cluster.run("scontrol", "show", "job", "-o", job).stdout
    assert re.search(r"\bExitCode=3:0\b", shown), shown


def test_a_job_sees_the_submitters_environment(slurm_cluster):
    token = uuid.uuid4().hex
    env = {**slurm_cluster.env, "TUNEPIPE_SLURM_PROBE": token}
    job, output = submit(slurm_cluster, "environment", 'echo "probe=$TUNEPIPE_SLURM_PROBE conf=$SLURM_CONF"', env=env)
    assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED", output.read_text()
    assert output.read_text().split() == [f"probe={token}", f"conf={slurm_cluster.root / 'slurm.conf'}"]


def test_everything_of_the_cluster_lives_in_its_folder(slurm_cluster):
    config = slurm_cluster.run("scontrol", "show", "config").stdout
    settings = dict(re.findall(r"^(\w+)\s+=\s+(.*?)\s*$", config, re.MULTILINE))
    root = str(slurm_cluster.root)
    for key in ("SLURM_CONF", "StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile",
                "SlurmctldLogFile", "SlurmdLogFile", "AuthInfo"):
        assert root in settings[key], (key, settings.get(key))
    assert sorted(p.name for p in (slurm_cluster.root / "munge").iterdir()) >= ["munge.key", "munge.socket"]
