"""`python -m pipeline.serve`: serve a base model folder and PEFT adapter folders, OpenAI-style.

    python -m pipeline.serve --base runs/base --adapter support=pulled/support/model \
        --adapter docs=pulled/docs/model --prompt-template $'### Question:\\n{prompt}\\n### Answer:\\n' --port 8000

`--port 0` binds a free port; the first line printed names it. `tunepipe serve` does the same from
registry versions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.serve.catalog import load_catalog, template_formatter
from pipeline.serve.http import serve


def _named_folder(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base model: a transformers folder (or hub id)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the base's)")
    p.add_argument("--adapter", action="append", type=_named_folder, default=[], metavar="NAME=FOLDER",
                   help="a PEFT adapter folder, served as NAME; repeat for more")
    p.add_argument("--base-name", default="base", help="the name the bare base model is served as")
    p.add_argument("--prompt-template", help="applied to every prompt; {prompt} is the request's (preprocess.prompt_template)")
    p.add_argument("--max-prompt-tokens", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        p.error("two --adapter options share a name")
    catalog = load_catalog(args.base, adapters, args.tokenizer, base_name=args.base_name,
                           format_prompt=template_formatter(args.prompt_template) if args.prompt_template else None,
                           max_prompt_tokens=args.max_prompt_tokens)
    serve(catalog, args.host, args.port)


main()
