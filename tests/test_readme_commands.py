"""Every command README.md shows runs, at a tiny size, and prints what the README says it prints.

    python -m pytest -q tests/test_readme_commands.py

Commands are read from the README's fenced ```bash / ```sh / ```console blocks (in console blocks,
the lines after `$ ` and the output shown under them). Each runs as a subprocess from the repository
root with the virtualenv's bin first on PATH, as after `source .venv/bin/activate`. What the test
changes, and why:

- pipeline runs get tiny `--set` overrides appended (tests/tiny.py, with a gate that tiny size can
  pass: TINY_MAX_PERPLEXITY; the MiniLM run MINILM_SMALL) and a `--workdir` under tmp_path, so the
  whole file takes about two minutes on 2 cores. All commands share one workdir: the data stages
  run once and are cached after that;
- paths the README writes relative to the checkout (`runs/...`, the registry `registry`,
  `./my-model`) are moved under tmp_path, so the test never writes into the repository;
- `<version>` and `<fingerprint>` become the version and tokenize fingerprint that earlier README
  commands produced (running those first when a case is selected alone);
- `make run` and `make test` are not run here (EXCLUDED says why): CI runs them.

A README edit that adds, drops or changes a command fails `test_readme_shows_the_expected_commands`:
update EXPECTED_COMMANDS, and the way the new command is checked, with it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny import REPO, tiny_overrides

README = REPO / "README.md"
RUNNABLE_BLOCKS = ("bash", "sh", "shell", "console")

EXPECTED_COMMANDS = [
    "make run",
    "make test",
    "tunepipe run examples/quickstart.yaml --set train.max_steps=400 --set train.lr=1e-3",
    "tunepipe run examples/quickstart.yaml --set train.nproc_per_node=2",
    "tunepipe run examples/quickstart.yaml --set train.strategy=deepspeed --set train.deepspeed_config=zero3",
    "tunepipe stage tokenize examples/quickstart.yaml",
    "tunepipe config --keys",
    'tunepipe deploy examples/quickstart.yaml --name nightly --cron "0 3 * * *" --print',
    "tunepipe registry list --registry registry",
    "tunepipe registry verify quickstart-gpt2 <version> --registry registry",
    "tunepipe registry pull quickstart-gpt2 <version> ./my-model --registry registry",
    'tunepipe generate quickstart-gpt2@latest --prompt "How do I reset my password?" --registry registry',
    "python examples/debian_corpus.py runs/data/debian6.csv",
    "tunepipe run examples/minilm_classification.yaml",
    "tunepipe run examples/quickstart.yaml --set train.lrr=1",
    "tunepipe stage tokenize examples/quickstart.yaml",
    "torchrun --standalone --nproc_per_node 2 -m pipeline.train --tokenized runs/tokenize/<fingerprint> "
    "--config examples/quickstart.yaml --output runs/by-hand/model --checkpoints runs/by-hand/checkpoints "
    "--set train.lr=3e-4",
    "tunepipe registry push runs/by-hand/model my-model v1 --registry registry",
]

EXCLUDED = {
    # Both build .venv (minutes: torch and every dependency) and `make test` runs this very file;
    # CI runs both on a fresh clone. What `make run` runs is `tunepipe run examples/quickstart.yaml`.
    "make run": "builds .venv and runs the quickstart at full size; exercised by CI",
    "make test": "builds .venv and runs the whole suite, this file included; exercised by CI",
}

COMMAND_PREFIXES = ("tunepipe ", "torchrun ", "python ", "make ")
"""The kinds of command this file knows how to run (or, for make, why not)."""

MINILM_SMALL = {
    # 400 rows, 10 LoRA steps and 64 scored rows instead of 3,616 rows, 150 steps and every held-out
    # row. The full run reaches accuracy 0.91 against the YAML's gate of 0.85 (docs/benchmarks.md);
    # 10 steps reach ~0.86 on these rows, so a gate of 0.5 (the largest class is 34 %) still proves
    # that LoRA learned, with room to spare.
    "sample.count": 400,
    "train.max_steps": 10,
    "train.warmup_steps": 2,
    "train.micro_batch_size": 16,
    "train.save_every_steps": 10,
    "evaluate.max_batches": 8,
    "evaluate.min_accuracy": 0.5,
}

TINY_MAX_PERPLEXITY = 200
"""The quickstart's gate at the tiny size: 40 steps of full fine-tuning reach 90-155 on a vocabulary of
300, a model that learned nothing stays near 300 (LoRA on the random base: 291)."""
TINY_STEPS = int(dict(o.split("=", 1) for o in tiny_overrides(Path("registry")))["train.max_steps"])
STAGES = ["ingest", "sample", "preprocess", "tokenize", "train", "evaluate", "publish"]


# ---------------------------------------------------------------- reading the README


@dataclass(frozen=True)
class Shown:
    command: str
    output: tuple[str, ...] = ()
    """What a ```console block shows under the command."""


def readme_commands(text: str) -> list[Shown]:
    """The commands of every runnable fenced block, in order; `\\` continuations joined, comments cut."""
    found: list[Shown] = []
    for language, body in re.findall(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        if language not in RUNNABLE_BLOCKS:
            continue
        lines = re.sub(r"\\\n\s*", "", body).splitlines()
        if language == "console":
            for line in lines:
                if line.startswith("$ "):
                    found.append(Shown(line[2:].strip()))
                elif found and line.strip():
                    found[-1] = Shown(found[-1].command, (*found[-1].output, line))
            continue
        for line in lines:
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                found.append(Shown(command))
    return found


SHOWN = readme_commands(README.read_text())
UNIQUE = list({s.command: s for s in SHOWN}.values())  # a command shown twice runs once


def test_readme_shows_the_expected_commands():
    assert [s.command for s in SHOWN] == EXPECTED_COMMANDS
    for shown in SHOWN:
        assert shown.command.startswith(COMMAND_PREFIXES), f"{shown.command!r}: this test does not know how to run it"
    assert set(EXCLUDED) <= {s.command for s in SHOWN}, "an exclusion names a command the README no longer shows"


def test_readme_commands_are_read_from_every_runnable_block():
    text = "\n".join([
        "```bash", "tunepipe run a.yaml \\", "    --set x=1   # why", "# a comment", "```",
        "```text", "tunepipe not-run", "```",
        "```console", "$ tunepipe bad", "tunepipe: error", "```",
        "```", "make never", "```",
    ])
    assert readme_commands(text) == [Shown("tunepipe run a.yaml --set x=1"), Shown("tunepipe bad", ("tunepipe: error",))]


# ---------------------------------------------------------------- running them


@dataclass
class Ran:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"$ {shlex.join(self.argv)}\n(exit {self.returncode})\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"


class Session:
    """One workdir, registry and Prefect home for every README command; results kept by command."""

    def __init__(self, root: Path, prefect_server):
        self.root = root
        self.workdir = root / "runs"  # the README's default --workdir, `runs`, moved here
        self.registry = root / "registry"
        bin_dir = REPO / ".venv" / "bin"
        bin_dir = bin_dir if bin_dir.is_dir() else Path(sys.executable).parent
        # `tunepipe run` records its flow runs on the session's Prefect server (PREFECT_API_URL),
        # as docs/scheduling.md shows, instead of starting a temporary server per command (~6 s
        # each); the temporary server's path is covered by test_error_lines.py and test_flow.py.
        self.env = prefect_server.env({"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})
        self.results: dict[str, Ran] = {}

    # -- what stands in for the README's placeholders and checkout-relative paths

    def local_path(self, arg: str) -> str:
        """Where a path the README writes relative to the checkout goes instead."""
        if arg.startswith("runs/"):
            return str(self.workdir / arg.removeprefix("runs/"))
        if arg.startswith("./"):
            return str(self.root / arg.removeprefix("./"))
        return arg

    def placeholder(self, name: str) -> str:
        if name == "version":  # the version the README's first quickstart run published
            first_run = next(s.command for s in SHOWN if s.command.startswith("tunepipe run examples/quickstart.yaml"))
            return Path(self.summary(self.result(first_run))["registry_version"]).name
        if name == "fingerprint":
            summary = self.summary(self.result("tunepipe stage tokenize examples/quickstart.yaml"))
            return summary["stages"][-1]["fingerprint"]
        raise AssertionError(f"no value for <{name}>")

    def argv(self, command: str) -> list[str]:
        command = re.sub(r"<(\w+)>", lambda m: self.placeholder(m.group(1)), command)
        words = shlex.split(command)
        # `--registry registry`: the README's registry folder, the quickstart's registry.url.
        argv = [str(self.registry) if before == "--registry" else self.local_path(w) for before, w in zip(["", *words], words)]
        pipeline = words[0] == "torchrun" or words[:2] in (["tunepipe", "run"], ["tunepipe", "stage"])
        if words[0] == "tunepipe" and pipeline:
            argv += ["--workdir", str(self.workdir)]
        if pipeline:
            config = next(w for w in words if w.endswith(".yaml"))
            for override in self.overrides(config):
                argv += ["--set", override]
        return argv

    def overrides(self, config: str) -> list[str]:
        if config == "examples/quickstart.yaml":
            # The registry commands name the quickstart's model, so it keeps that name.
            return tiny_overrides(self.registry, **{"registry.model_name": "quickstart-gpt2", "evaluate.max_perplexity": TINY_MAX_PERPLEXITY})
        if config == "examples/minilm_classification.yaml":
            # The YAML reads runs/data/debian6.csv, which the README's debian_corpus.py line wrote here.
            values = {"data.source": self.local_path("runs/data/debian6.csv"), "registry.url": str(self.registry), **MINILM_SMALL}
            return [f"{k}={v}" for k, v in values.items()]
        raise AssertionError(f"{config}: say how this test runs it small")

    # -- running

    def result(self, command: str) -> Ran:
        if command not in self.results:
            for needed in prerequisites(command):
                self.result(needed)
            if command.startswith("tunepipe generate "):
                self.publish_quickstart_with_room_to_answer()
            argv = self.argv(command)
            proc = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=900)
            self.results[command] = Ran(argv, proc.returncode, proc.stdout, proc.stderr)
        return self.results[command]

    def publish_quickstart_with_room_to_answer(self) -> None:
        """The README's model has 128 positions, the tiny stand-in 32, which the question alone
        fills: `generate` then refuses it. A stand-in of 64 positions becomes quickstart-gpt2@latest."""
        argv = ["tunepipe", "stage", "publish", "examples/quickstart.yaml", "--workdir", str(self.workdir)]
        for override in [*self.overrides("examples/quickstart.yaml"), "tokenize.block_size=64", "train.max_steps=10",
                         "evaluate.max_perplexity=null"]:
            argv += ["--set", override]
        proc = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def summary(self, ran: Ran) -> dict:
        assert ran.returncode == 0, ran.describe()
        last = ran.stdout.strip().splitlines()[-1]
        assert last.endswith("summary.json") and Path(last).is_file(), ran.describe()
        return json.loads(Path(last).read_text())


def prerequisites(command: str) -> list[str]:
    """README commands that must have run before `command` (the README shows them in this order)."""
    if "minilm_classification.yaml" in command:
        return [s.command for s in SHOWN if "debian_corpus.py" in s.command]
    if command.startswith("tunepipe registry push "):  # pushes the folder the by-hand torchrun wrote
        return [s.command for s in SHOWN if s.command.startswith("torchrun ")]
    return []


@pytest.fixture(scope="module")
def session(tmp_path_factory, prefect_server) -> Session:
    return Session(tmp_path_factory.mktemp("readme"), prefect_server)


def same_value(used, shown: str) -> bool:
    if str(used) == shown:
        return True
    try:
        return float(used) == float(shown)
    except (TypeError, ValueError):
        return False


def expected_settings(command: str) -> dict[str, str]:
    """The README's own `--set train.KEY=VALUE`s, as {KEY: VALUE}."""
    return dict(m.groups() for m in re.finditer(r"--set train\.(\w+)=(\S+)", command))


# ---------------------------------------------------------------- what each command must print


def check_pipeline_run(session: Session, shown: Shown, ran: Ran) -> None:
    summary = session.summary(ran)
    assert [s["name"] for s in summary["stages"]] == STAGES
    for stage in summary["stages"]:
        assert (Path(stage["output"]) / "manifest.json").is_file(), f"{stage['name']}: {stage['output']} not committed"
    version = Path(summary["registry_version"])
    assert (version / "manifest.json").is_file() and (version / "model").is_dir(), ran.describe()
    # A README example must not set a key its run ignores, nor train what cannot learn there.
    warnings = re.findall(r"^(?:.* - )?(?:tunepipe: )?(warning: .*)$", ran.stdout + ran.stderr, flags=re.M)
    assert not warnings, warnings
    assert f"published: {version}" in ran.stdout

    train = summary["stages"][STAGES.index("train")]
    used = json.loads((Path(train["output"]) / "manifest.json").read_text())["config"]["train"]
    settings = expected_settings(shown.command)
    for key, value in settings.items():
        if key != "max_steps":  # the tiny run's, on purpose; any other README setting must have been used
            assert same_value(used[key], value), f"train.{key}: the run used {used[key]!r}, the README sets {value}"
    assert train["stats"]["world_size"] == int(settings.get("nproc_per_node", 1))
    assert train["stats"]["strategy"] == settings.get("strategy", "ddp")
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["gate"]["passed"], metrics["gate"]
    if "minilm" in shown.command:
        assert train["stats"]["method"] == "lora" and train["stats"]["trainable_params"] < 0.05 * train["stats"]["total_params"]
        assert metrics["task"] == "classification" and metrics["accuracy"] >= MINILM_SMALL["evaluate.min_accuracy"]
        assert metrics["gate"]["thresholds"] == {"min_accuracy": MINILM_SMALL["evaluate.min_accuracy"]}
    else:
        assert metrics["task"] == "causal_lm" and metrics["gate"]["thresholds"] == {"max_perplexity": TINY_MAX_PERPLEXITY}


def check_stage(session: Session, shown: Shown, ran: Ran) -> None:
    summary = session.summary(ran)
    name = shlex.split(shown.command)[2]
    assert [s["name"] for s in summary["stages"]] == STAGES[: STAGES.index(name) + 1]
    output = summary["stages"][-1]["output"]
    assert (Path(output) / "manifest.json").is_file()
    # The README says its log names the output folder.
    assert re.search(rf"^\[{name}\] \w+ -> {re.escape(output)}$", ran.stdout, flags=re.M), ran.describe()


def check_config_keys(session: Session, shown: Shown, ran: Ran) -> None:
    from pipeline.config import describe_fields

    assert ran.returncode == 0, ran.describe()
    keys = [key for key, _, _ in describe_fields()]
    listed = re.findall(r"^(\S+) = ", ran.stdout, flags=re.M)
    assert listed == keys and {"train.lr", "train.deepspeed_config", "registry.url"} <= set(listed)


def check_deploy_print(session: Session, shown: Shown, ran: Ran) -> None:
    # --print contacts no server: the prefect.yaml of a nightly deployment of the quickstart.
    import yaml

    from pipeline.config import build_config, load_config

    assert ran.returncode == 0, ran.describe()
    [deployment] = yaml.safe_load(ran.stdout)["deployments"]
    assert deployment["name"] == "nightly" and deployment["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC"}]
    assert deployment["entrypoint"] == "flows.finetune.finetune" and deployment["work_pool"] == {"name": "tunepipe"}
    config = build_config(deployment["parameters"]["config"], deployment["parameters"]["overrides"])
    assert config == load_config(REPO / "examples" / "quickstart.yaml")


def check_registry(session: Session, shown: Shown, ran: Ran) -> None:
    from pipeline.cli import build_parser

    assert ran.returncode == 0, ran.describe()
    args = build_parser().parse_args(ran.argv[1:])
    assert Path(args.registry) == session.registry, "the README's registry commands must name the quickstart's registry"
    if args.registry_command == "push":
        check_push(session, args, ran)
        return
    version = session.placeholder("version")
    url = session.registry / "quickstart-gpt2" / version
    if args.registry_command == "list":
        assert re.search(rf"^quickstart-gpt2\s+{version}\s.*{re.escape(str(url))}\s*$", ran.stdout, flags=re.M), ran.describe()
    elif args.registry_command == "verify":
        assert ran.stdout.strip() == f"ok: {url}"
    else:
        assert ran.stdout.strip() == f"pulled and verified: {args.names[-1]}"
        weights = "model/model.safetensors"
        assert (Path(args.names[-1]) / weights).read_bytes() == (url / weights).read_bytes()


def check_generate(session: Session, shown: Shown, ran: Ran) -> None:
    """The completion the published quickstart gives, greedy, in its own template: the same text
    this process gets from the registry."""
    from pipeline.cli import build_parser
    from pipeline.serve.generate import generate_from_registry

    assert ran.returncode == 0, ran.describe()
    args = build_parser().parse_args(ran.argv[1:])
    assert Path(args.registry) == session.registry
    expected = generate_from_registry(str(session.registry), args.model, args.prompt[0], args.max_new_tokens)
    assert ran.stdout == expected + "\n", ran.describe()


def check_push(session: Session, args, ran: Ran) -> None:
    """The folder is now a committed version holding exactly its files, byte for byte."""
    from pipeline import artifacts

    url = session.registry / args.model / args.version
    assert ran.stdout.strip() == f"published: {url}", ran.describe()
    assert artifacts.verify(str(url)) == []
    folder = Path(args.folder)
    pushed = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert "model/model.safetensors" in pushed, sorted(pushed)
    assert set(json.loads((url / "manifest.json").read_text())["files"]) == set(pushed)
    assert {rel: (url / rel).read_bytes() for rel in pushed} == pushed


def check_debian_corpus(session: Session, shown: Shown, ran: Ran) -> None:
    assert ran.returncode == 0, ran.describe()
    out = Path(ran.argv[-1])
    printed = re.match(r"(\d+) rows -> ", ran.stdout)
    assert printed, ran.describe()
    count = int(printed.group(1))
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["text", "label"] and len(rows) - 1 == count >= 1000


def check_torchrun(session: Session, shown: Shown, ran: Ran) -> None:
    assert ran.returncode == 0, ran.describe()
    words = shlex.split(shown.command)
    output = Path(session.local_path(words[words.index("--output") + 1]))
    stats = json.loads((output / "train_stats.json").read_text())
    assert stats["world_size"] == int(words[words.index("--nproc_per_node") + 1])
    assert stats["steps"] == TINY_STEPS and stats["resumed_from_step"] == 0
    assert (output / "model" / "model.safetensors").is_file()
    checkpoints = Path(session.local_path(words[words.index("--checkpoints") + 1]))
    assert (checkpoints / f"step_{TINY_STEPS:08d}" / "COMPLETE").is_file()


def check_console(session: Session, shown: Shown, ran: Ran) -> None:
    # The README shows a config error: exit 2 and exactly the lines shown.
    assert ran.returncode == 2, ran.describe()
    assert (ran.stdout + ran.stderr).strip().splitlines() == list(shown.output)


def checker(shown: Shown):
    words = shlex.split(shown.command)
    if shown.output:
        return check_console
    if words[0] == "torchrun":
        return check_torchrun
    if words[:2] == ["python", "examples/debian_corpus.py"]:
        return check_debian_corpus
    if words[0] == "tunepipe":
        return {"run": check_pipeline_run, "stage": check_stage, "config": check_config_keys, "registry": check_registry,
                "deploy": check_deploy_print, "generate": check_generate}[words[1]]
    raise AssertionError(f"{shown.command!r}: no check for it")


def skip_reason(shown: Shown) -> str | None:
    if "debian_corpus.py" in shown.command or "minilm_classification.yaml" in shown.command:
        import glob
        import importlib.util

        spec = importlib.util.spec_from_file_location("debian_corpus", REPO / "examples" / "debian_corpus.py")
        debian_corpus = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(debian_corpus)
        if not glob.glob(debian_corpus.INDEX_GLOB):
            return f"no Debian package index ({debian_corpus.INDEX_GLOB}): this machine has not run apt-get update"
    return None


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("shown", UNIQUE, ids=[s.command for s in UNIQUE])
def test_readme_command_runs_and_prints_what_the_readme_says(session, shown):
    reason = EXCLUDED.get(shown.command) or skip_reason(shown)
    if reason:
        pytest.skip(reason)
    if shown.output:
        # A command shown failing runs exactly as shown, in a workdir of its own that must stay empty.
        workdir = session.root / "must-stay-empty"
        argv = [*shlex.split(shown.command), "--workdir", str(workdir)]
        proc = subprocess.run(argv, cwd=REPO, env=session.env, capture_output=True, text=True, timeout=300)
        ran = Ran(argv, proc.returncode, proc.stdout, proc.stderr)
        check_console(session, shown, ran)
        assert not workdir.exists(), "a stage ran despite the config error"
        return
    checker(shown)(session, shown, session.result(shown.command))
