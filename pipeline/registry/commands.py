"""`tunepipe registry ...`: the registry commands behind the CLI's parser (pipeline/cli.py).

    tunepipe registry list
    tunepipe registry promote quickstart-gpt2@latest --to production --max perplexity=2.0
    tunepipe registry pull quickstart-gpt2@production ./copy --with-base
    tunepipe registry export quickstart-gpt2@production ./hf --merge
    tunepipe registry html --out site
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.run_report import text_table


def _named_version(registry_url: str, names: list[str], trailing: int) -> tuple[str, str, list[str]]:
    """(model, version, the other words) from `MODEL@X ...` or `MODEL VERSION ...`, where
    `trailing` words (a destination, an alias) follow the model's name."""
    from pipeline.registry.aliases import resolve
    from pipeline.registry.store import RegistryError

    if "@" in names[0]:
        if len(names) != 1 + trailing:
            raise RegistryError(f"after {names[0]!r} expected {trailing} more word(s), got {names[1:]}")
        model, version = resolve(registry_url, names[0])
        return model, version, names[1:]
    if len(names) != 2 + trailing:
        raise RegistryError(f"expected MODEL VERSION or MODEL@X followed by {trailing} word(s), got {names}")
    return names[0], names[1], names[2:]


def _bounds(pairs: list[str], flag: str) -> dict[str, float]:
    from pipeline.registry.store import RegistryError

    out = {}
    for pair in pairs:
        metric, sep, value = pair.partition("=")
        try:
            out[metric.strip()] = float(value)
        except ValueError:
            raise RegistryError(f"{flag} {pair!r}: expected METRIC=NUMBER, e.g. accuracy=0.9") from None
        if not sep or not metric.strip():
            raise RegistryError(f"{flag} {pair!r}: expected METRIC=NUMBER, e.g. accuracy=0.9")
    return out


def run_registry_command(args) -> int:
    from pipeline import artifacts
    from pipeline.registry import aliases
    from pipeline.registry import store as registry

    reg = args.registry
    if args.registry_command == "list":
        rows = registry.list_versions(reg)
        if not rows:
            print(f"no published versions under {reg}")
            return 0
        table_rows = [
            [r["model"], r["version"], ", ".join(r["aliases"]), time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created_unix"] or 0)),
             r["files"], f"{r['bytes'] / 1e6:.1f} MB", r["metric"], r["url"]]
            for r in rows
        ]
        print(text_table(table_rows, ["model", "version", "aliases", "created (UTC)", "files", "size", "metric", "url"]))
        return 0
    if args.registry_command == "push":
        url, written = registry.push_folder(Path(args.folder), reg, args.model, args.version)
        print(f"published: {url}" if written else f"already published, same content: {url}")
        return 0
    if args.registry_command == "html":
        from pipeline.registry.site import write_site

        print(f"wrote {write_site(reg, Path(args.out))}")
        return 0
    if args.registry_command == "export":
        from pipeline.registry.export import export

        if len(args.names) != 2:
            raise registry.RegistryError(f"expected MODEL@X DEST, got {args.names}")
        dest = export(reg, args.names[0], Path(args.names[1]), merge=args.merge)
        print(f"exported {args.names[0]}{' (merged)' if args.merge else ''}: {dest}")
        return 0
    if args.registry_command == "history":
        if len(args.names) != 2:
            raise registry.RegistryError(f"expected MODEL ALIAS, got {args.names}")
        moves = aliases.history(reg, *args.names)
        if not moves:
            print(f"{args.names[0]} has no alias {args.names[1]!r} under {reg}")
            return 0
        rows = [[time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.moved_unix)), m.previous or "-", m.version, m.reason] for m in moves]
        print(text_table(rows, ["moved (UTC)", "from", "to", "why"]))
        return 0
    trailing = {"pull": 1, "verify": 0, "alias": 1, "promote": 0}[args.registry_command]
    model, version, rest = _named_version(reg, args.names, trailing)
    if args.registry_command == "verify":
        url = registry.version_url(reg, model, version)
        problems = artifacts.verify(url)
        print("\n".join(problems) if problems else f"ok: {url}")
        return 1 if problems else 0
    if args.registry_command == "alias":
        move = aliases.move(reg, model, rest[0], version, reason="alias")
        print(f"{model}: {move.alias} -> {version}" + (f" (was {move.previous})" if move.previous else ""))
        return 0
    if args.registry_command == "promote":
        from pipeline.registry.promote import promote

        move = promote(reg, model, version, args.to, _bounds(args.min, "--min"), _bounds(args.max, "--max"))
        print(f"{model}: {move.alias} -> {version}" + (f" (was {move.previous})" if move.previous else "") + f"; {move.reason}")
        return 0
    dest = registry.pull_version(reg, model, version, Path(rest[0]))
    print(f"pulled and verified: {dest}")
    if args.with_base:
        from pipeline.registry.base_records import pull_base

        base = pull_base(reg, dest)
        print(f"its base: {base}" if base else "it is a whole model: no base to pull")
    return 0
