"""Try to break published models as bases (`model.name: registry://MODEL@X`) and the verified
local copies every loader reads (pipeline/registry/{bases,base_records,local_copy,loading,export}.py).

    .venv/bin/python -m pytest tests/test_registry_bases.py -q

Nothing is trained: each version is built by hand (a 1-layer GPT-2 of width 16 and a tiny BPE
tokenizer, or a LoRA adapter on it with random, non-zero B matrices) and published with
`store.publish_version`, so the whole file runs in seconds. Each test gets its own cache folder
(TUNEPIPE_REGISTRY_CACHE), so what it finds there is its own doing.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import artifacts
from pipeline.config import ConfigError, ModelConfig, build_config
from pipeline.registry import aliases
from pipeline.registry.base_records import describe_base, pull_base, read_base
from pipeline.registry.bases import RegistryBase, model_source, registry_base
from pipeline.registry.local_copy import CACHE_ENV, local_copy, pull_version, version_cache
from pipeline.registry.names import RegistryError
from pipeline.registry.store import publish_version

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TRAINED_JSON = "tunepipe_trained.json"
TEXTS = [f"how do I reset my password number {i}? open settings and choose reset." for i in range(40)]
PROBE = "how do I reset my password?"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """This test's own registry cache (subprocesses inherit it through the environment)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    monkeypatch.delenv(artifacts.VERIFY_ENV, raising=False)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.text_tokenizer import EOS, train_byte_level_bpe

    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=train_byte_level_bpe(TEXTS, 300), eos_token=EOS, pad_token=EOS).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- versions built by hand


def tiny_gpt2(tokenizer_dir: Path, seed: int):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=32, bos_token_id=eos, eos_token_id=eos)
    return GPT2LMHeadModel(config).eval()


def publish_full(tmp_path: Path, registry: str, name: str, version: str, tokenizer_dir: Path, seed: int = 0,
                 alias: str | None = "latest"):
    """Publish a whole-model version; returns the model it holds."""
    model = tiny_gpt2(tokenizer_dir, seed)
    bundle = tmp_path / f"bundle-{name}-{version}"
    model.save_pretrained(bundle / "model")
    record = {"method": "full", "trained_with": "full", "base": None, "config": model.config.to_dict(), "task": "causal_lm"}
    (bundle / "model" / TRAINED_JSON).write_text(json.dumps(record, indent=1, default=str))
    shutil.copytree(tokenizer_dir, bundle / "tokenizer")
    publish_version(bundle, registry, name, version, {"x": version})
    if alias:
        aliases.move(registry, name, alias, version)
    return model


def publish_lora(tmp_path: Path, registry: str, name: str, version: str, base_model, base_ref: dict, tokenizer_dir: Path, seed: int = 1):
    """Publish an adapters-only LoRA version on `base_model` (B matrices random, so merging
    changes the weights); returns the PEFT model it holds."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                 fan_in_fan_out=True, task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for param_name, param in lora.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.5)
    lora.eval()
    bundle = tmp_path / f"bundle-{name}-{version}"
    lora.save_pretrained(bundle / "model")
    record = {"method": "peft", "trained_with": "lora", "base": None, "config": base_model.config.to_dict(), "task": "causal_lm"}
    (bundle / "model" / TRAINED_JSON).write_text(json.dumps(record, indent=1, default=str))
    (bundle / "base.json").write_text(json.dumps(base_ref))
    shutil.copytree(tokenizer_dir, bundle / "tokenizer")
    publish_version(bundle, registry, name, version, {"x": version})
    aliases.move(registry, name, "latest", version)
    return lora


def logits(model, tokenizer_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def registry_cfg(registry: str, reference: str, *more: str):
    return build_config(None, [f"model.name=registry://{reference}", f"model.registry={registry}", *more])


def hidden_only(folder: Path) -> None:
    """Whatever a refused or finished pull left in a version's cache folder: hidden names only."""
    if folder.exists():
        visible = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
        assert visible == [], visible


# ---------------------------------------------------------------- 1. the config


@pytest.mark.parametrize("overrides, where", [
    ([], "registry"),
    (["registry.url=s3://bucket/team-registry"], "s3://bucket/team-registry"),
    (["registry.url=/srv/registry"], "/srv/registry"),
    (["registry.url=/srv/registry", "model.registry=/elsewhere/registry"], "/elsewhere/registry"),
])
def test_a_registry_name_alone_starts_from_the_published_model(overrides, where):
    cfg = build_config(None, ["model.name=registry://m@production", *overrides])
    assert cfg.model.init == "pretrained"
    assert cfg.model.registry == where
    assert not [line for line in cfg.ignored_settings() if line.startswith("model.")], cfg.ignored_settings()
    again = build_config(cfg.model_dump(mode="json"))
    assert again == cfg
    assert again.model_dump(mode="json") == cfg.model_dump(mode="json")


def test_a_registry_name_with_init_scratch_is_refused_naming_model_init():
    with pytest.raises(ConfigError) as e:
        build_config(None, ["model.name=registry://m@production", "model.init=scratch"])
    assert "model.init" in str(e.value) and "'scratch'" in str(e.value) and "model.init=pretrained" in str(e.value)


@pytest.mark.parametrize("name", ["registry://m", "registry://a/b@x", "registry://@x", "registry://m@"])
def test_a_malformed_registry_name_fails_with_one_clear_message(name):
    with pytest.raises(ConfigError) as e:
        build_config(None, [f"model.name={name}"])
    header, *problems = str(e.value).splitlines()
    assert len(problems) == 1, str(e.value)
    assert repr(name) in problems[0] and "registry://MODEL@ALIAS or registry://MODEL@VERSION" in problems[0]


@pytest.mark.parametrize("overrides", [["model.init=pretrained", "model.name=gpt2"], ["model.init=scratch"]])
def test_model_registry_without_a_registry_name_is_reported_ignored(overrides):
    cfg = build_config(None, [*overrides, "model.registry=/srv/registry"])
    lines = [line for line in cfg.ignored_settings() if line.startswith("model.registry ")]
    assert lines == ["model.registry is set but ignored: model.name is not a registry:// name; it is not part of the cache key"]


# ---------------------------------------------------------------- 2. resolving and fingerprints


def test_the_alias_decides_the_base_and_the_train_fingerprint(tmp_path, tokenizer_dir):
    from pipeline.stages import plan
    from pipeline.train.fingerprint import content_fingerprint

    registry = str(tmp_path / "registry")
    publish_full(tmp_path, registry, "m", "v1", tokenizer_dir, seed=0, alias="production")
    publish_full(tmp_path, registry, "m", "v2", tokenizer_dir, seed=1, alias=None)
    cfg = registry_cfg(registry, "m@production")

    def digest(version: str) -> str:
        import hashlib

        return hashlib.sha256((tmp_path / "registry" / "m" / version / "manifest.json").read_bytes()).hexdigest()

    def fingerprints() -> tuple[dict, str]:
        return content_fingerprint(cfg.model, cfg.train, cfg.slurm)["base"], plan(cfg, "train")["train"]

    assert registry_base(cfg.model) == RegistryBase(registry, "m", "v1", digest("v1"))
    base1, train1 = fingerprints()
    assert base1 == {"registry_version": "m@v1", "manifest_sha256": digest("v1")}

    aliases.move(registry, "m", "production", "v2")
    assert registry_base(cfg.model) == RegistryBase(registry, "m", "v2", digest("v2"))
    base2, train2 = fingerprints()
    assert base2 == {"registry_version": "m@v2", "manifest_sha256": digest("v2")}
    assert train2 != train1

    aliases.move(registry, "m", "production", "v1")
    assert fingerprints() == (base1, train1)


def test_a_moved_registry_keeps_the_train_fingerprint(tmp_path, tokenizer_dir):
    """model.registry is where to look, not what the base is: a copied registry plans the same run."""
    from pipeline.stages import plan

    registry = tmp_path / "registry"
    publish_full(tmp_path, str(registry), "m", "v1", tokenizer_dir, alias="production")
    before = plan(registry_cfg(str(registry), "m@production"), "train")["train"]
    shutil.copytree(registry, tmp_path / "moved")
    assert plan(registry_cfg(str(tmp_path / "moved"), "m@production"), "train")["train"] == before


@pytest.mark.parametrize("overrides", [["model.init=pretrained", "model.name=gpt2"], ["model.init=scratch"]])
def test_other_names_have_no_registry_base(overrides):
    from pipeline.train.fingerprint import registry_base_content

    cfg = build_config(None, overrides)
    assert registry_base(cfg.model) is None
    assert registry_base_content(cfg.model) == {}  # a hub base is keyed by its commit instead: test_base_content.py
    assert model_source(cfg.model) == cfg.model.name


def test_an_alias_that_does_not_exist_is_named(tmp_path, tokenizer_dir):
    registry = str(tmp_path / "registry")
    publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    with pytest.raises(RegistryError, match="no alias or version 'production'"):
        registry_base(registry_cfg(registry, "m@production").model)


@pytest.mark.parametrize("reference", ["..@x", ".aliases@x", "m@../x", "m@.hidden"])
def test_a_hostile_registry_name_never_leaves_the_registry(tmp_path, tokenizer_dir, reference):
    """The config checks only the shape of the name; the registry refuses names that are paths."""
    registry = str(tmp_path / "registry")
    publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    with pytest.raises(RegistryError, match="is not a valid name"):
        registry_base(registry_cfg(registry, reference).model)


# ---------------------------------------------------------------- 3. model_source


def test_model_source_is_a_plain_folder_made_once(tmp_path, tokenizer_dir, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = str(tmp_path / "registry")
    published = publish_full(tmp_path, registry, "m", "v1", tokenizer_dir, alias="production")
    cfg = registry_cfg(registry, "m@production")

    source = Path(model_source(cfg.model))
    assert source == version_cache(registry, "m", "v1") / "hf"
    # Its own manifest (what was built, checked on reuse); the version's record and manifest left out.
    assert set(json.loads((source / "manifest.json").read_text())["files"]) == {p.name for p in source.iterdir()} - {"manifest.json"}
    assert not (source / TRAINED_JSON).exists()
    same_weights(AutoModelForCausalLM.from_pretrained(source), published)
    loaded, original = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert loaded(PROBE)["input_ids"] == original(PROBE)["input_ids"] and len(loaded) == len(original)

    made = (source / "manifest.json").stat().st_mtime_ns
    assert Path(model_source(cfg.model)) == source
    assert (source / "manifest.json").stat().st_mtime_ns == made  # reused, not made again
    assert sorted(p.name for p in version_cache(registry, "m", "v1").iterdir()) == ["copy", "hf"]


def test_two_registries_never_share_a_copy(tmp_path, tokenizer_dir, monkeypatch):
    """The same MODEL@VERSION in two registries is two models; one registry named two ways is one."""
    from transformers import AutoModelForCausalLM

    first = publish_full(tmp_path / "a", str(tmp_path / "a" / "registry"), "m", "v1", tokenizer_dir, seed=0)
    second = publish_full(tmp_path / "b", str(tmp_path / "b" / "registry"), "m", "v1", tokenizer_dir, seed=1)
    for where, published in (("a", first), ("b", second)):
        source = model_source(registry_cfg(str(tmp_path / where / "registry"), "m@latest").model)
        same_weights(AutoModelForCausalLM.from_pretrained(source), published)
    monkeypatch.chdir(tmp_path / "a")
    assert version_cache("registry", "m", "v1") == version_cache(str(tmp_path / "a" / "registry"), "m", "v1")
    assert local_copy("registry", "m", "v1") == version_cache(str(tmp_path / "a" / "registry"), "m", "v1") / "copy"


def test_an_adapter_version_is_refused_as_a_base(tmp_path, tokenizer_dir):
    registry = str(tmp_path / "registry")
    base = publish_full(tmp_path, registry, "base", "b1", tokenizer_dir)
    publish_lora(tmp_path, registry, "bot", "a1", base, {"registry": {"model": "base", "version": "b1"}}, tokenizer_dir)
    with pytest.raises(RegistryError) as e:
        model_source(registry_cfg(registry, "bot@latest").model)
    assert "bot@a1" in str(e.value) and "--merge" in str(e.value) and "lora" in str(e.value)


# ---------------------------------------------------------------- 4. damage


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_truncated_local_copy_is_refused_as_damaged(tmp_path, tokenizer_dir, damage):
    registry = str(tmp_path / "registry")
    publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    folder = local_copy(registry, "m", "v1")
    weights = folder / "model" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    else:
        weights.unlink()
    with pytest.raises(RegistryError) as e:
        local_copy(registry, "m", "v1")
    assert "damaged" in str(e.value) and str(folder) in str(e.value) and "model.safetensors" in str(e.value)
    with pytest.raises(RegistryError, match="damaged"):
        model_source(registry_cfg(registry, "m@latest").model)


def test_a_same_size_edit_of_the_local_copy_is_found_under_verify(tmp_path, tokenizer_dir, monkeypatch):
    registry = str(tmp_path / "registry")
    publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    folder = local_copy(registry, "m", "v1")
    config = folder / "model" / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"n_embd": 16', '"n_embd": 32'))
    assert len(config.read_text()) == len(text)
    monkeypatch.setenv(artifacts.VERIFY_ENV, "1")
    with pytest.raises(RegistryError, match="damaged") as e:
        local_copy(registry, "m", "v1")
    assert "sha256" in str(e.value) and str(folder) in str(e.value)


def test_a_local_copy_without_its_manifest_is_reported_damaged(tmp_path, tokenizer_dir):
    """A copy half-removed by hand (`rm -r` deletes in directory order): its manifest gone, its
    weights still there. Reusing it is wrong, and so is a bare OSError."""
    registry = str(tmp_path / "registry")
    publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    folder = local_copy(registry, "m", "v1")
    (folder / "manifest.json").unlink()
    try:
        again = local_copy(registry, "m", "v1")
    except RegistryError as e:
        assert str(folder) in str(e)
    else:  # or the copy is made again, whole
        assert artifacts.verify(str(again)) == []


@pytest.mark.parametrize("edit", ["append", "same_size"])
def test_a_version_changed_in_the_registry_is_refused_by_the_first_pull(tmp_path, tokenizer_dir, edit):
    registry = str(tmp_path / "registry")
    publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    weights = tmp_path / "registry" / "m" / "v1" / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data + b"\0" if edit == "append" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(RegistryError, match="does not verify") as e:
        local_copy(registry, "m", "v1")
    assert "model/model.safetensors: sha256 mismatch" in str(e.value)
    assert not (version_cache(registry, "m", "v1") / "copy").exists()
    hidden_only(version_cache(registry, "m", "v1"))
    with pytest.raises(RegistryError, match="does not verify"):
        model_source(registry_cfg(registry, "m@latest").model)
    assert not (version_cache(registry, "m", "v1") / "hf").exists()


def test_a_damaged_derived_folder_is_not_loaded(tmp_path, tokenizer_dir):
    """The `hf` folder model_source hands to from_pretrained is made from a verified copy, and
    reused: a truncated file in it must not be handed on as the version."""
    from transformers import AutoModelForCausalLM

    registry = str(tmp_path / "registry")
    published = publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    cfg = registry_cfg(registry, "m@latest")
    weights = Path(model_source(cfg.model)) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    try:
        source = Path(model_source(cfg.model))
    except RegistryError as e:
        assert "damaged" in str(e) and str(weights.parent) in str(e)
    else:  # or it is made again from the verified copy
        copied = local_copy(registry, "m", "v1") / "model" / "model.safetensors"
        assert (source / "model.safetensors").stat().st_size == copied.stat().st_size, "the truncated file was handed on"
        same_weights(AutoModelForCausalLM.from_pretrained(source), published)


# ---------------------------------------------------------------- 5. two processes, one copy

_RACER = """
import sys, time
from pathlib import Path
import pipeline.registry.bases as bases
import pipeline.registry.local_copy as local_copy
from pipeline.config import ModelConfig

registry, meeting, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

def meet(step):
    # Wait until both processes have done `step`: then both renames race and one loses.
    (meeting / f"{step}-{me}").write_text("")
    deadline = time.monotonic() + 30
    while len(list(meeting.glob(f"{step}-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.002)

pull, write = local_copy.pull_version, bases.write_whole_model
local_copy.pull_version = lambda *args: (pull(*args), meet("pulled"))[0]
bases.write_whole_model = lambda *args: (write(*args), meet("built"))[0]
print(local_copy.local_copy(registry, "m", "v1"))
print(bases.model_source(ModelConfig(name="registry://m@latest", registry=registry)))
"""


@pytest.mark.integration
def test_two_processes_make_one_local_copy(tmp_path, tokenizer_dir):
    """Every rank of a run on a registry base makes the copy at once. Both processes pull (and
    build `hf/`) before either renames, so one of them loses each rename: both use the winner's."""
    from transformers import AutoModelForCausalLM

    registry = str(tmp_path / "registry")
    published = publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, registry, str(meeting), str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    assert sorted(p.name for p in meeting.iterdir()) == ["built-0", "built-1", "pulled-0", "pulled-1"]
    first, second = (out.split() for out, _ in outputs)
    folder = version_cache(registry, "m", "v1")
    assert first == second == [str(folder / "copy"), str(folder / "hf")]
    assert artifacts.verify(str(folder / "copy")) == []
    assert sorted(p.name for p in folder.iterdir()) == ["copy", "hf"]  # no .copy-*, .hf-*, *.pulling-*
    same_weights(AutoModelForCausalLM.from_pretrained(folder / "hf"), published)


# ---------------------------------------------------------------- 6. S3


@pytest.mark.integration
def test_bases_and_versions_load_from_s3(tmp_path, tokenizer_dir, s3_bucket):
    from transformers import AutoModelForCausalLM

    from pipeline.registry.loading import load_copy, load_version

    registry = f"s3://{s3_bucket}/registry"
    base = publish_full(tmp_path, registry, "base", "b1", tokenizer_dir)
    lora = publish_lora(tmp_path, registry, "bot", "a1", base, {"registry": {"model": "base", "version": "b1"}}, tokenizer_dir)
    expected = logits(lora, tokenizer_dir)

    cfg = registry_cfg(registry, "base@latest")
    assert registry_base(cfg.model).version == "b1"
    source = model_source(cfg.model)
    assert Path(source) == version_cache(registry, "base", "b1") / "hf"
    same_weights(AutoModelForCausalLM.from_pretrained(source), base)

    loaded = load_version(registry, "base@latest")
    assert (loaded.name, loaded.version) == ("base", "b1")
    same_weights(loaded.model, base)
    torch.testing.assert_close(logits(load_version(registry, "bot@latest").model, tokenizer_dir), expected, atol=1e-5, rtol=0)

    pulled = pull_version(registry, "bot", "a1", tmp_path / "pulled")
    assert pull_base(registry, pulled) == str(pulled / "base")
    assert artifacts.verify(str(pulled / "base")) == []
    assert read_base(str(pulled)) == {"registry": {"model": "base", "version": "b1"}}
    # No registry at all now: the base must come from pulled/base.
    torch.testing.assert_close(logits(load_copy(pulled, None).model, tokenizer_dir), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- 7. base records


def test_describe_base_for_each_kind_of_start(tmp_path, tokenizer_dir, monkeypatch):
    registry = str(tmp_path / "registry")
    publish_full(tmp_path, registry, "m", "v1", tokenizer_dir, alias="production")
    assert describe_base(ModelConfig(init="scratch")) is None
    (tmp_path / "here" / "local-model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    assert describe_base(ModelConfig(init="pretrained", name="local-model")) == {"path": str(tmp_path / "here" / "local-model")}
    cfg = registry_cfg(registry, "m@production")
    assert describe_base(cfg.model) == {"registry": {"model": "m", "version": "v1"}, "url": registry}


def test_an_adapter_loads_its_base_from_another_registry(tmp_path, tokenizer_dir):
    """base.json's "url": the base lives in a registry other than the adapter's."""
    from pipeline.registry.loading import load_version

    bases_registry, registry = str(tmp_path / "bases"), str(tmp_path / "registry")
    base = publish_full(tmp_path, bases_registry, "base", "b1", tokenizer_dir)
    ref = {"registry": {"model": "base", "version": "b1"}, "url": bases_registry}
    lora = publish_lora(tmp_path, registry, "bot", "a1", base, ref, tokenizer_dir)
    loaded = load_version(registry, "bot@latest")
    assert loaded.base == ref
    torch.testing.assert_close(logits(loaded.model, tokenizer_dir), logits(lora, tokenizer_dir), atol=1e-5, rtol=0)
    assert (version_cache(bases_registry, "base", "b1") / "copy" / "manifest.json").is_file()
    pulled = pull_version(registry, "bot", "a1", tmp_path / "pulled")
    assert pull_base(registry, pulled) == str(pulled / "base")
    assert artifacts.verify(str(pulled / "base")) == []


def test_read_base_and_pull_base_of_a_whole_model(tmp_path, tokenizer_dir):
    registry = str(tmp_path / "registry")
    base = publish_full(tmp_path, registry, "base", "b1", tokenizer_dir)
    publish_lora(tmp_path, registry, "bot", "a1", base, {"registry": {"model": "base", "version": "b1"}}, tokenizer_dir)
    assert read_base(str(tmp_path / "registry" / "base" / "b1")) is None
    assert read_base(str(tmp_path / "registry" / "bot" / "a1")) == {"registry": {"model": "base", "version": "b1"}}
    pulled = pull_version(registry, "base", "b1", tmp_path / "pulled")
    assert pull_base(registry, pulled) is None
    assert not (pulled / "base").exists()


# ---------------------------------------------------------------- 8. export


@pytest.mark.parametrize("occupied", ["folder", "file"])
def test_export_refuses_an_occupied_dest_and_leaves_it_alone(tmp_path, tokenizer_dir, occupied):
    from pipeline.registry.export import export

    registry = str(tmp_path / "registry")
    publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    if occupied == "folder":
        dest.mkdir()
        (dest / "keep.txt").write_text("mine")
    else:
        dest.write_text("mine")
    before = {str(p): (p.read_bytes() if p.is_file() else None) for p in [dest, *dest.rglob("*")]}
    with pytest.raises(RegistryError, match="not an empty folder"):
        export(registry, "m@latest", dest)
    assert {str(p): (p.read_bytes() if p.is_file() else None) for p in [dest, *dest.rglob("*")]} == before
    assert [p.name for p in dest.parent.iterdir()] == ["dest"]


def test_export_of_a_whole_model_loads_with_from_pretrained(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.registry.export import export

    registry = str(tmp_path / "registry")
    published = publish_full(tmp_path, registry, "m", "v1", tokenizer_dir)
    dest = tmp_path / "out" / "m"
    dest.mkdir(parents=True)  # an empty folder is a valid DEST
    assert export(registry, "m@latest", dest) == dest
    assert not (dest / TRAINED_JSON).exists() and not (dest / "manifest.json").exists()
    same_weights(AutoModelForCausalLM.from_pretrained(dest), published)
    assert AutoTokenizer.from_pretrained(dest)(PROBE)["input_ids"] == AutoTokenizer.from_pretrained(tokenizer_dir)(PROBE)["input_ids"]
    assert [p.name for p in dest.parent.iterdir()] == ["m"]


def test_export_of_lora_merged_and_unmerged_gives_the_adapter_models_logits(tmp_path, tokenizer_dir):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from pipeline.registry.export import export

    registry = str(tmp_path / "registry")
    base = publish_full(tmp_path, registry, "base", "b1", tokenizer_dir)
    lora = publish_lora(tmp_path, registry, "bot", "a1", base, {"registry": {"model": "base", "version": "b1"}}, tokenizer_dir)
    expected = logits(lora, tokenizer_dir)
    assert (expected - logits(base, tokenizer_dir)).abs().max() > 1e-2  # the adapter changes the answer

    merged = export(registry, "bot@latest", tmp_path / "merged", merge=True)
    assert not (merged / "adapter_config.json").exists()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged).eval(), tokenizer_dir), expected, atol=1e-5, rtol=0)

    plain = export(registry, "bot@latest", tmp_path / "plain")
    config = json.loads((plain / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "plain" / "base").resolve())
    torch.testing.assert_close(logits(AutoPeftModelForCausalLM.from_pretrained(plain).eval(), tokenizer_dir), expected, atol=1e-5, rtol=0)


def test_a_merged_and_pushed_adapter_serves_as_a_base(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from pipeline.registry.export import export
    from pipeline.registry.store import push_folder

    registry = str(tmp_path / "registry")
    base = publish_full(tmp_path, registry, "base", "b1", tokenizer_dir)
    lora = publish_lora(tmp_path, registry, "bot", "a1", base, {"registry": {"model": "base", "version": "b1"}}, tokenizer_dir)
    push_folder(export(registry, "bot@latest", tmp_path / "merged", merge=True), registry, "bot-merged", "m1")
    source = model_source(registry_cfg(registry, "bot-merged@m1").model)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(source).eval(), tokenizer_dir), logits(lora, tokenizer_dir),
                               atol=1e-5, rtol=0)
