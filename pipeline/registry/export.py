"""Export a version as a plain Hugging Face folder, for tools that know nothing of tunepipe.

    tunepipe registry export support-bot@production out/support-bot            # as published
    tunepipe registry export support-bot@production out/support-bot --merge    # LoRA merged into the base

A whole model becomes one folder with its weights, config and tokenizer: `from_pretrained(DEST)`
loads it. An adapters-only version becomes the PEFT adapter and tokenizer in DEST, with its base
as a plain folder in DEST/base (or the hub id it names), and adapter_config.json pointing there,
so `AutoPeftModelForCausalLM.from_pretrained(DEST)` works. `--merge` folds LoRA weights into the
base (`merge_and_unload`): a whole model whose logits equal the adapter model's within float
tolerance. Prompt tuning and bottleneck adapters add inputs or modules, not weight deltas, and
cannot be merged; they are refused with that reason.

The export is written beside DEST and renamed onto it once complete; a DEST that exists and is
not empty is refused, so nothing there is overwritten.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.registry.bases import copy_plain_files, write_whole_model
from pipeline.registry.local_copy import into_new_folder
from pipeline.registry.names import RegistryError


def export(registry: str, reference: str, dest: Path, merge: bool = False) -> Path:
    from pipeline.registry import aliases

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RegistryError(f"{dest} exists and is not an empty folder; export into a new folder (nothing was changed)")
    model, version = aliases.resolve(registry, reference)
    final = dest.resolve()
    return into_new_folder(dest, "export", lambda partial: write_plain(registry, model, version, partial, merge=merge, final=final))


def write_plain(registry: str, model: str, version: str, dest: Path, merge: bool = False, final: Path | None = None) -> None:
    """Write `model/version` into the existing empty folder `dest`. `final`: where `dest` will be
    renamed to (adapter_config.json must name the base's final place)."""
    from pipeline.registry.base_records import point_adapter_at, read_base
    from pipeline.registry.loading import base_copy, base_location, version_record
    from pipeline.registry.local_copy import local_copy

    copy = local_copy(registry, model, version)
    record = version_record(copy)
    kind = record.get("method")
    if kind == "full":
        write_whole_model(copy, dest)
        return
    if merge:
        _write_merged(copy, registry, dest, record)
    elif kind == "peft":
        copy_plain_files(copy / "model", dest)
        reference = read_base(str(copy)) or {}
        if "registry" in reference:
            (dest / "base").mkdir()
            write_whole_model(base_copy(copy, reference, registry), dest / "base")
            point_adapter_at(dest / "adapter_config.json", str((final or dest) / "base"), None)
        else:
            base, kwargs = base_location(copy, registry)
            point_adapter_at(dest / "adapter_config.json", base, kwargs.get("revision"))
    else:
        raise RegistryError(f"{model}@{version} holds {record.get('trained_with', kind)} adapters, which are tunepipe's own "
                            "modules, not a Hugging Face format; load it with tunepipe (generate, serve, load_version)")
    copy_plain_files(copy / "tokenizer", dest)


def _write_merged(copy: Path, registry: str, dest: Path, record: dict) -> None:
    from pipeline.registry.loading import load_copy

    trained_with = record.get("trained_with")
    if trained_with not in ("lora", "qlora", "peft"):
        raise RegistryError(f"--merge folds LoRA weights into the base; this version was trained with {trained_with!r}, "
                            "which adds inputs or modules rather than weight deltas: export it without --merge")
    loaded = load_copy(copy, registry)
    merged = loaded.model.merge_and_unload()
    merged.save_pretrained(dest, safe_serialization=True)
