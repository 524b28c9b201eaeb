"""The registry's static site (pipeline/registry/site.py): what a person sees when opening it from
disk in a real browser (headless Chromium, tests/browser.py), and that writing it never deletes
a folder it did not make and never stops at one damaged version.

    python -m pytest -q tests/test_registry_site.py
    TUNEPIPE_REQUIRE_BROWSER=1 python -m pytest -q tests/test_registry_site.py   # fail, not skip, without /usr/bin/chromium
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from browser import CHROMIUM, Browser
from tiny import write_tree

from pipeline.registry import aliases
from pipeline.registry import store
from pipeline.registry.site import MARKER, SiteError, write_site

HOSTILE = "<script>document.title='pwned'</script>"
HOSTILE_GENERATION = "<img src=x onerror=\"document.title='pwned2'\">"

CARD = f"""---
license: apache-2.0
base_model: gpt2
tags:
- text-generation
- tunepipe
model-index:
- name: support-gpt2
  results:
  - task: {{type: text-generation}}
    metrics: [{{type: perplexity, value: 12.5}}]
---
# Support GPT-2, fine-tuned

A tiny GPT-2 tuned on support tickets.

## Evaluation

| metric | value |
| --- | --- |
| perplexity | 12.5 |
| eval_loss | 2.526 |

![training loss](curves/loss.png)

![learning rate](curves/lr.png)

![badge](https://example.com/badge.svg)

{HOSTILE}
"""


def png(width: int, height: int, shade: int) -> bytes:
    """A valid RGB PNG (a gradient), from its definition: signature, IHDR, IDAT, IEND."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    rows = b"".join(b"\x00" + bytes((x * 4 + y + shade) % 256 for x in range(width) for _ in range(3)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def metrics(**values) -> bytes:
    gate = {"passed": True, "thresholds": {"max_perplexity": 40.0} if "perplexity" in values else {"min_accuracy": 0.85}, "failed": []}
    return json.dumps({**values, "gate": gate}).encode()


def build_registry(root: Path) -> str:
    """Two models: support-gpt2 v1..v3 (v3 with a card, curves and generations) and
    minilm-sections 2024.1, 2024.2 (pushed folders, no card); `latest` and `production` moved."""
    reg = str(root / "registry")
    for version, ppl in (("v1", 30.25), ("v2", 18.5), ("v3", 12.5)):
        files = {"model/model.safetensors": version.encode() * 100, "config.yaml": b"train:\n  lr: 0.001\n"}
        if version == "v3":
            generations = [{"prompt": "My order is late", "tuned": HOSTILE_GENERATION, "reference": "Sorry to hear that"}]
            files |= {"metrics.json": metrics(perplexity=ppl, eval_loss=2.526, generations=generations), "README.md": CARD.encode(),
                      "curves/loss.png": png(64, 32, 0), "curves/lr.png": png(48, 24, 90)}
        else:
            files["metrics.json"] = metrics(perplexity=ppl, eval_loss=3.0)
        store.publish_version(write_tree(root / f"bundle-{version}", files), reg, "support-gpt2", version, {"v": version})
        aliases.move(reg, "support-gpt2", "latest", version, reason="publish")
        if version in ("v2", "v3"):
            aliases.move(reg, "support-gpt2", "production", version, reason="promote (verified, gate passed)")
    for version, acc in (("2024.1", 0.88), ("2024.2", 0.9125)):
        folder = write_tree(root / f"push-{version}", {"model/model.safetensors": version.encode() * 50,
                                                        "metrics.json": metrics(accuracy=acc, macro_f1=acc - 0.03)})
        store.push_folder(folder, reg, "minilm-sections", version)
    aliases.move(reg, "minilm-sections", "production", "2024.2", reason="promote")
    return reg


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("href", "src") and v is not None]


def _pages(site: Path) -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in site.rglob("*.html")}


# ---------------------------------------------------------------- without a browser


def test_the_site_links_only_to_its_own_files_and_shows_registry_text_as_text(tmp_path):
    reg = build_registry(tmp_path)
    index = write_site(reg, tmp_path / "site")
    site = tmp_path / "site"
    assert index == site / "index.html" and (site / MARKER).is_file()
    pages = _pages(site)
    assert {p.relative_to(site).as_posix() for p in pages} == {
        "index.html", "models/support-gpt2/index.html", "models/minilm-sections/index.html",
        *(f"models/support-gpt2/versions/{v}/index.html" for v in ("v1", "v2", "v3")),
        *(f"models/minilm-sections/versions/{v}/index.html" for v in ("2024.1", "2024.2"))}
    for page, text in pages.items():
        parser = _Links()
        parser.feed(text)
        assert "script" not in parser.tags and "iframe" not in parser.tags, page
        for link in parser.links:  # every link and image is a file of the site, reached relatively
            assert not urlsplit(link).scheme and not link.startswith("/"), (page, link)
            assert (page.parent / unquote(link)).resolve().is_file(), (page, link)
        assert '<meta charset="utf-8">' in text
    v3 = pages[site / "models/support-gpt2/versions/v3/index.html"]
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in v3
    assert "&lt;img src=x onerror=" in v3
    assert "<td>base_model</td><td>gpt2</td>" in v3 and "<td>tags</td><td>text-generation, tunepipe</td>" in v3
    assert "license: apache-2.0" not in v3  # the front matter is a table, not raw YAML
    assert '<img src="curves/loss.png" alt="training loss"' in v3
    assert "[image not in this version: badge]" in v3  # a remote image is never fetched
    assert (site / "models/support-gpt2/versions/v3/curves/loss.png").read_bytes() == png(64, 32, 0)


def test_a_folder_it_did_not_write_is_refused_and_left_as_it_was(tmp_path):
    reg = build_registry(tmp_path)
    foreign = tmp_path / "mine"
    write_tree(foreign, {"notes.txt": b"keep me"})
    with pytest.raises(SiteError, match=r"not empty and was not written by `tunepipe registry html`.*nothing was changed"):
        write_site(reg, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_bytes() == b"keep me"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SiteError, match="is not a folder"):
        write_site(reg, tmp_path / "a-file")
    with pytest.raises(SiteError, match="registry .* is inside"):
        write_site(reg, tmp_path)
    with pytest.raises(SiteError, match="no registry at"):
        write_site(str(tmp_path / "registy"), tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    (tmp_path / "empty").mkdir()
    assert write_site(reg, tmp_path / "empty").is_file()  # an empty folder is fine


def test_its_own_previous_site_is_replaced_whole(tmp_path):
    reg = build_registry(tmp_path)
    site = tmp_path / "out" / "site"
    write_site(reg, site)
    (site / "stale.html").write_text("from the first write")
    bundle = write_tree(tmp_path / "bundle-v4", {"model/model.safetensors": b"v4" * 10, "metrics.json": metrics(perplexity=9.75)})
    store.publish_version(bundle, reg, "support-gpt2", "v4", {"v": "v4"})
    aliases.move(reg, "support-gpt2", "production", "v4", reason="promote")
    write_site(reg, site)
    assert not (site / "stale.html").exists()
    assert "9.75" in (site / "models/support-gpt2/index.html").read_text()
    assert (site / "models/support-gpt2/versions/v4/index.html").is_file()
    assert sorted(p.name for p in site.parent.iterdir()) == ["site"]  # the old one deleted, no staging left


def test_a_damaged_version_is_shown_as_such_and_the_rest_is_written(tmp_path, capsys):
    reg = build_registry(tmp_path)
    (Path(reg) / "support-gpt2/v1/manifest.json").write_text("{not json")
    (Path(reg) / "support-gpt2/v3/README.md").write_text("# Edited after publish\n")
    (Path(reg) / "minilm-sections/2024.1/metrics.json").write_bytes(b"\xff\xfe")  # wrong sha256 too
    site = tmp_path / "site"
    write_site(reg, site)
    err = capsys.readouterr().err
    assert "support-gpt2@v1: unreadable manifest" in err
    assert "support-gpt2@v3: README.md does not match its sha256" in err
    assert "minilm-sections@2024.1: metrics.json does not match its sha256" in err
    model = (site / "models/support-gpt2/index.html").read_text()
    assert "unreadable manifest" in model and "18.5" in model and "12.5" in model
    assert "manifest is unreadable: JSONDecodeError" in (site / "models/support-gpt2/versions/v1/index.html").read_text()
    v3 = (site / "models/support-gpt2/versions/v3/index.html").read_text()
    assert "Edited after publish" not in v3 and "README.md is unreadable" in v3 and "curves/loss.png" in v3
    assert "0.9125" in (site / "models/minilm-sections/index.html").read_text()
    index = (site / "index.html").read_text()
    assert "2 models, 5 versions" in index and "perplexity 12.5" in index


# ---------------------------------------------------------------- in a browser


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("TUNEPIPE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TUNEPIPE_REQUIRE_BROWSER=1 but {CHROMIUM} is absent (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; TUNEPIPE_REQUIRE_BROWSER=1 fails instead)")
    with Browser.start(tmp_path / "chromium-profile") as b:
        yield b


@pytest.mark.integration
def test_a_person_browses_the_site_from_disk(tmp_path, browser):
    site = tmp_path / "site"
    index = write_site(build_registry(tmp_path), site)
    browser.navigate(index.as_uri())
    text = browser.text()
    assert browser.evaluate("document.title") == "Model registry"
    assert "support-gpt2" in text and "minilm-sections" in text
    assert "production → v3" in text and "production → 2024.2" in text and "perplexity 12.5" in text

    browser.click('a[href="models/support-gpt2/index.html"]')
    text = browser.text()
    assert browser.url() == (site / "models/support-gpt2/index.html").as_uri()
    for version, ppl in (("v1", "30.25"), ("v2", "18.5"), ("v3", "12.5")):
        row = browser.evaluate(f"[...document.querySelectorAll('tr')].find(r => r.cells[0].innerText === '{version}').innerText")
        assert ppl in row and "passed" in row, row
    assert "latest" in text and "promote (verified, gate passed)" in text  # the alias history: why it moved

    browser.click('a[href="versions/v3/index.html"]')
    text = browser.text()
    assert "Support GPT-2, fine-tuned" in text and "perplexity\t12.5" in text and "eval_loss\t2.526" in text
    assert "base_model\tgpt2" in text  # the front matter, as a table
    assert HOSTILE in text and HOSTILE_GENERATION in text  # shown as text ...
    assert browser.evaluate("document.title") == "support-gpt2@v3"  # ... and never run
    assert browser.evaluate("document.images.length") == 2 and browser.images_loaded()
    assert browser.evaluate("[...document.images].map(i => i.naturalWidth)") == [64, 48]

    browser.navigate((site / "models/minilm-sections/index.html").as_uri())
    row = browser.evaluate("[...document.querySelectorAll('tr')].find(r => r.cells[0].innerText === '2024.2').innerText")
    assert "0.9125" in row and "0.8825" in row and "production" in row
    assert all(url.startswith(("file://", "about:")) for url in browser.requested), browser.requested
