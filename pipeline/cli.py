"""`tunepipe`: run the fine-tuning pipeline, one stage, or look at the registry.

    tunepipe run examples/quickstart.yaml --set train.max_steps=100
    tunepipe stage ingest examples/quickstart.yaml --workdir runs
    tunepipe registry list --registry registry
    tunepipe slurm script examples/quickstart.yaml --set train.nnodes=2 > train.sbatch
    tunepipe deploy examples/quickstart.yaml --name nightly --cron "0 3 * * *"
    tunepipe config --keys
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from pipeline.config import ConfigError, PipelineConfig, describe_fields, load_config
from pipeline.run_report import SUMMARY_HEADER, summary_rows, text_table

EPILOG = """examples:
  tunepipe run examples/quickstart.yaml                      # the whole DAG, cached, resumable
  tunepipe run examples/quickstart.yaml --set train.nproc_per_node=2 --set train.lr=3e-4
  tunepipe stage tokenize examples/quickstart.yaml           # one stage and what it needs, no Prefect
  tunepipe registry list --registry registry
  tunepipe registry pull quickstart-gpt2 <version> ./model-copy
  tunepipe registry promote quickstart-gpt2@latest --to production --max perplexity=2.0
  tunepipe registry pull quickstart-gpt2@production ./model-copy
  tunepipe registry push runs/by-hand/model my-model v1      # a folder made anywhere, as a version
  tunepipe registry export quickstart-gpt2@production ./hf-folder --merge
  tunepipe registry html --out site                          # open site/index.html
  tunepipe generate quickstart-gpt2@production --prompt "How do I reset my password?"
  tunepipe serve --adapter support=support-bot@latest --adapter docs=docs-bot@latest --port 8000
  tunepipe run examples/quickstart.yaml --set train.launcher=slurm --set train.nnodes=2   # train as a Slurm job
  tunepipe slurm script examples/quickstart.yaml --set train.nnodes=2 > train.sbatch     # the same job, by hand
  tunepipe k8s manifest examples/quickstart.yaml --workdir s3://bucket/runs | kubectl apply -f -
  PREFECT_API_URL=http://127.0.0.1:4200/api tunepipe run examples/quickstart.yaml   # recorded on a Prefect server
  tunepipe deploy examples/quickstart.yaml --name nightly --cron "0 3 * * *"       # scheduled (needs PREFECT_API_URL)
  tunepipe worker                                            # runs the scheduled runs of pool `tunepipe`
  tunepipe config --keys                                     # every config key, default and meaning
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="pipeline YAML (omit for the embedded defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--workdir", default="runs", help="where stage outputs live: a folder or s3:// URL (default: runs)")
    p.add_argument("--verify", action="store_true", help="hash every file of every reused output (default: only files whose size or time changed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description="Fine-tuning pipelines: raw data to a published, versioned model.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on a failure, show the traceback (default: one line)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    _add_config_args(run)

    stage = sub.add_parser("stage", help="run one stage (and the stages it needs) without Prefect")
    from pipeline.stages import ORDER

    stage.add_argument("name", choices=ORDER)
    _add_config_args(stage)

    registry = sub.add_parser("registry", help="list, pull, verify, push, alias or promote published versions",
                              description="A model is named MODEL VERSION, or MODEL@VERSION, or MODEL@ALIAS "
                              "(`latest` is moved by every publish; others by `alias` and `promote`).")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True)
    commands = [
        ("list", "list published versions and their aliases", []),
        ("pull", "copy a version into a new folder and verify it", ["MODEL[@X] [VERSION]", "DEST"]),
        ("verify", "check a version's files against its manifest", ["MODEL[@X] [VERSION]"]),
        ("push", "publish a model folder made anywhere (a hand-run torchrun, another tool) as a version", []),
        ("alias", "point ALIAS at a version (no checks; see promote); every move is kept", ["MODEL[@X] [VERSION]", "ALIAS"]),
        ("promote", "re-verify a version and re-check its gate (and --min/--max), then move an alias to it", ["MODEL[@X] [VERSION]"]),
        ("history", "every move of an alias, oldest first", ["MODEL", "ALIAS"]),
        ("export", "write a version as a plain Hugging Face folder (--merge: LoRA folded into the base)", ["MODEL@X", "DEST"]),
        ("html", "write a static site of the registry (models, versions, aliases, cards with curves)", []),
    ]
    for name, help_text, words in commands:
        p = registry_sub.add_parser(name, help=help_text, usage=f"tunepipe registry {name} {' '.join(words)} [options]" if words else None)
        p.add_argument("--registry", default="registry", help="registry root: folder or s3:// URL (default: registry)")
        if name == "html":
            p.add_argument("--out", required=True, help="folder to write the site into (index.html opens from disk)")
        elif name == "push":
            p.add_argument("folder", help="the folder to publish, every file in it")
            p.add_argument("model")
            p.add_argument("version")
        elif words:
            p.add_argument("names", nargs="+", metavar="NAME", help=" ".join(words))
        if name == "pull":
            p.add_argument("--with-base", action="store_true", help="also pull the base an adapters-only version loads on, into DEST/base")
        if name == "export":
            p.add_argument("--merge", action="store_true", help="fold LoRA weights into the base: one whole model")
        if name == "promote":
            p.add_argument("--to", required=True, metavar="ALIAS", help="the alias to move, e.g. production")
            p.add_argument("--min", action="append", default=[], metavar="METRIC=VALUE", help="also require METRIC >= VALUE (repeatable)")
            p.add_argument("--max", action="append", default=[], metavar="METRIC=VALUE", help="also require METRIC <= VALUE (repeatable)")

    generate = sub.add_parser("generate", help="complete a prompt with a published version (verified, offline), in its own template")
    generate.add_argument("model", metavar="MODEL@X", help="the version: MODEL@ALIAS or MODEL@VERSION")
    generate.add_argument("--registry", default="registry", help="registry root: folder or s3:// URL (default: registry)")
    generate.add_argument("--prompt", required=True, action="append", help="the prompt, as a user would ask it (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: 40)")
    generate.add_argument("--adapter", metavar="MODEL@X", help="an adapters-only version to apply on MODEL@X instead of its own base")
    generate.add_argument("--raw", action="store_true", help="send the prompt as is, without the version's template")

    serve = sub.add_parser("serve", help="serve a base and many adapters on it over HTTP, OpenAI-style (/v1/completions)",
                           description="Load the base once and every adapter on it; answer POST /v1/completions where "
                           "`model` names an adapter (or the base), GET /v1/models and GET /health.")
    serve.add_argument("--registry", default="registry", help="registry root: folder or s3:// URL (default: registry)")
    serve.add_argument("--base", metavar="MODEL@X", help="the base version (default: the base the adapters record)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=MODEL@X", help="an adapters-only version served as NAME (repeatable)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")

    slurm = sub.add_parser("slurm", help="the sbatch script of the train stage, to submit by hand")
    slurm_sub = slurm.add_subparsers(dest="slurm_command", required=True)
    script = slurm_sub.add_parser("script", help="run the CPU stages (cached), then print the train job's sbatch script; "
                                  "the job's model is adopted by the next `tunepipe run` of this config")
    _add_config_args(script)
    k8s = sub.add_parser("k8s", help="Kubernetes manifests for the train stage")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    manifest = k8s_sub.add_parser("manifest", help="run the CPU stages (cached), then print what `kubectl apply -f -` takes "
                                  "to train on train.nnodes pods (needs an s3:// --workdir)")
    _add_config_args(manifest)

    deploy = sub.add_parser("deploy", help="create or update a scheduled Prefect deployment of a config (on PREFECT_API_URL)",
                            description="Validate the config, then create or update a deployment of the tunepipe flow whose "
                            "parameters are the resolved config and the workdir, on the server at PREFECT_API_URL. "
                            "A process work pool (default `tunepipe`) and its train concurrency limit are created if missing.")
    deploy.add_argument("config", nargs="?", help="pipeline YAML (omit for the embedded defaults)")
    deploy.add_argument("--name", required=True, help="deployment name, e.g. nightly")
    when = deploy.add_mutually_exclusive_group()
    when.add_argument("--cron", help='cron schedule, e.g. "0 3 * * *" (03:00 every day)')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS")
    deploy.add_argument("--timezone", default="UTC", help="IANA time zone of --cron (default: UTC)")
    deploy.add_argument("--pool", default="tunepipe", help="process work pool the runs go to (default: tunepipe)")
    deploy.add_argument("--workdir", default="runs", help="where stage outputs live, relative to this folder or s3:// (default: runs)")
    deploy.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    deploy.add_argument("--print", action="store_true", help="print the equivalent prefect.yaml instead of deploying")
    worker = sub.add_parser("worker", help="start a Prefect process worker for a pool (runs scheduled runs until stopped)")
    worker.add_argument("--pool", default="tunepipe", help="work pool to serve (default: tunepipe)")
    worker.add_argument("worker_args", nargs=argparse.REMAINDER, help="passed on to `prefect worker start` (after --)")

    config = sub.add_parser("config", help="print the resolved config, or every key with --keys")
    _add_config_args(config)
    config.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")
    return parser


def write_summary(results, cfg: PipelineConfig, workdir: str) -> Path:
    from pipeline.artifacts import is_remote

    base = Path(workdir) if not is_remote(workdir) else Path("runs")
    stamp = base / "history" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for suffix in range(10_000):  # two runs in one second (or at once) each get a folder of their own
        run_dir = stamp if suffix == 0 else Path(f"{stamp}-{suffix}")
        try:
            run_dir.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    publish = next((r for r in results if r.name == "publish"), None)
    summary = {
        "stages": [r.as_summary() for r in results],
        "registry_version": publish.stats.get("url") if publish else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    print()
    print(text_table(summary_rows(results), SUMMARY_HEADER))
    if summary["registry_version"]:
        print(f"\npublished: {summary['registry_version']}")
    return run_dir / "summary.json"


def cmd_run(args, cfg: PipelineConfig) -> int:
    server = os.environ.get("PREFECT_API_URL")
    if not server:
        # No server to record the run on: a run with nothing to do is answered from the cache
        # alone, without starting Prefect's temporary server (seconds, for a no-op).
        from pipeline.stages import cached_run

        results = cached_run(cfg, args.workdir)
        if results is not None:
            for r in results:
                print(f"[{r.name}] cached -> {r.output}")
            print("every stage is cached: nothing to run, so no Prefect flow run was started "
                  "(set PREFECT_API_URL to record every run on a Prefect server)")
            print(write_summary(results, cfg, args.workdir).resolve())
            return 0
    # Offline machines: Prefect's telemetry would only log connection errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A fresh PREFECT_HOME spends ~20 s on database migrations, which is Prefect's whole
    # default start-up allowance for the embedded server on a 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The embedded server's SQLite file lives in PREFECT_HOME; Prefect does not create it.
    Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser().mkdir(parents=True, exist_ok=True)
    from flows.embedded_server import start_bound_to_this_process
    from flows.finetune import finetune

    if server:
        print(f"tunepipe: running on the Prefect server at {server}", file=sys.stderr)
    else:
        start_bound_to_this_process()
    if not args.debug:
        _one_line_failures()
    config = cfg.model_dump(mode="json")
    try:
        return _summarised(lambda: finetune(config, workdir=args.workdir), cfg, args.workdir)
    finally:
        # Prefect logs "Stopping temporary server" at exit: keep the summary path (stdout) and
        # the reason of a failure (stderr) the last lines.
        logging.getLogger("prefect").setLevel(logging.WARNING)


def cmd_stage(args, cfg: PipelineConfig) -> int:
    from pipeline.stages import run_stages

    return _summarised(lambda: run_stages(cfg, args.workdir, until=args.name), cfg, args.workdir)


def _summarised(run, cfg: PipelineConfig, workdir: str) -> int:
    """Run the stages; write summary.json (a failed run's too) and print its path as the last line."""
    from pipeline.stages import StageFailed

    try:
        results = run()
    except StageFailed as failed:
        print(write_summary(failed.results, cfg, workdir).resolve())
        raise
    print(write_summary(results, cfg, workdir).resolve())
    return 0


class _NoTraceback(logging.Filter):
    """Prefect logs a failed task's traceback; without --debug the CLI's one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return "Traceback (most recent call last)" not in record.getMessage()


def _one_line_failures() -> None:
    # On the loggers that report run failures (a logger's filters see its records before any
    # handler, console or API, does), so Prefect's own handler set-up cannot drop them.
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.engine", "prefect.flow_engine", "prefect.task_engine"):
        logging.getLogger(name).addFilter(_NoTraceback())


def cmd_registry(args) -> int:
    from pipeline.registry.commands import run_registry_command

    return run_registry_command(args)


def cmd_generate(args) -> int:
    from pipeline.serve.generate import generate_from_registry

    for prompt in args.prompt:
        print(generate_from_registry(args.registry, args.model, prompt, args.max_new_tokens, adapter=args.adapter, raw=args.raw))
    return 0


def cmd_serve(args) -> int:
    from pipeline.serve.registry import serve_from_registry

    return serve_from_registry(args.registry, args.base, args.adapter, args.host, args.port)


def cmd_slurm(args, cfg: PipelineConfig) -> int:
    from pipeline.cluster.commands import slurm_script_for

    print(slurm_script_for(cfg, args.workdir), end="")
    return 0


def cmd_k8s(args, cfg: PipelineConfig) -> int:
    from pipeline.cluster.commands import k8s_manifest_for

    print(k8s_manifest_for(cfg, args.workdir), end="")
    return 0


def cmd_deploy(args, cfg: PipelineConfig) -> int:
    from flows.deploy import apply, plan_deployment, prefect_yaml

    deployment = plan_deployment(cfg, args.name, args.workdir, pool=args.pool, cron=args.cron, interval_s=args.interval, timezone=args.timezone)
    if args.print:
        print(prefect_yaml(deployment), end="")
        return 0
    deployment_id = apply(deployment)
    when = f"cron {args.cron!r} ({args.timezone})" if args.cron else f"every {args.interval:g}s" if args.interval else "no schedule (run it by hand)"
    print(f"deployment {'tunepipe-finetune/' + args.name} ({deployment_id}) on pool {args.pool!r}: {when}")
    print(f"start a worker for it: tunepipe worker --pool {args.pool}")
    print(f"or run it now:         prefect deployment run 'tunepipe-finetune/{args.name}'")
    return 0


def cmd_worker(args) -> int:
    from flows.deploy import start_worker

    extra = args.worker_args[1:] if args.worker_args[:1] == ["--"] else args.worker_args
    return start_worker(args.pool, extra)


def cmd_config(args, cfg: PipelineConfig) -> int:
    if args.keys:
        for key, default, doc in describe_fields():
            # Docstrings wrap over several lines: indent them all under their key.
            print(f"{key} = {default}\n    " + "\n    ".join(line.strip() for line in doc.splitlines()))
        return 0
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is (see _unwind_on_sigterm)."""


def _unwind_on_sigterm() -> None:
    """SIGTERM (`kill`, a scheduler stopping the job) unwinds like Ctrl-C instead of ending the
    process on the spot: a training job is asked to checkpoint first (train/stage.py), and exit
    hooks run. Prefect swaps in its own handler while a flow runs, then re-sends the signal to this
    one once it has marked the run crashed."""

    def raise_terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)


def _exit_within(seconds: float, code: int) -> None:
    """Bound the exit after a stop. Prefect's exit hook drains its queue services and can wait
    forever: seen with a run stopped while it queued for a slot of a full concurrency limit (the
    slot request never completes). Exit hooks that finish in time run as usual."""

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("registry", "worker", "generate", "serve"):
        try:
            # Validate the whole config before any stage runs: a typo must not cost a training run.
            implied = {"slurm": ["train.launcher=slurm"], "k8s": ["train.launcher=kubernetes"]}.get(args.command, [])
            cfg = load_config(args.config, [*implied, *args.set])
        except (ConfigError, OSError) as e:
            print(f"tunepipe: {e}", file=sys.stderr)
            return 2
        if args.command in ("run", "stage"):
            for line in cfg.ignored_settings():
                print(f"tunepipe: warning: {line}", file=sys.stderr)
    if getattr(args, "verify", False):
        from pipeline.artifacts import VERIFY_ENV

        os.environ[VERIFY_ENV] = "1"  # read where outputs are reused, in this process and its children
    if args.command in ("run", "stage"):
        _unwind_on_sigterm()
    try:
        if args.command == "registry":
            return cmd_registry(args)
        if args.command == "worker":
            return cmd_worker(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        commands = {"run": cmd_run, "stage": cmd_stage, "config": cmd_config, "slurm": cmd_slurm, "k8s": cmd_k8s, "deploy": cmd_deploy}
        return commands[args.command](args, cfg)
    except KeyboardInterrupt as stop:
        if args.debug:
            raise
        # 128 + the signal's number, as a shell reports a process ended by it.
        name, code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)
        print(f"tunepipe: stopped by {name}; a rerun reuses every committed stage and resumes training "
              "from its last checkpoint", file=sys.stderr)
        _exit_within(30.0, code)
        return code
    except Exception as e:
        if args.debug:
            raise
        # One line a user can act on; the traceback is for --debug.
        known = type(e).__module__.startswith(("pipeline.", "flows."))
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tunepipe: {reason}" if known else f"tunepipe: {type(e).__name__}: {reason} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
