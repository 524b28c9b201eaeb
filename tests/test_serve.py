"""Serving one base and many adapters (pipeline/serve): real models, real PEFT folders, a real server.

In process, on a tiny GPT-2 with two LoRA adapters and a soft prompt: each adapter answers as it
would loaded alone, the base weights exist once, prompts over the position table are refused with
their counts, sampling repeats per seed. Through `python -m pipeline.serve` subprocesses (integration),
on a ~26M-parameter base: the `openai` client lists and completes, bad requests get their 4xx,
SIGTERM stops the server cleanly, and a second adapter costs far less memory than a second base.

    .venv/bin/python -m pytest tests/test_serve.py -q -s      # -s prints the measured resident memory
"""

from __future__ import annotations

import csv
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "### Question:\n{prompt}\n### Answer:\n"
PROMPT = "How long is the warranty on the NovaSound headset?"
_STARTUP_SECONDS = 120  # three servers import torch + transformers at once on two busy cores


# ---------------------------------------------------------------- fixtures: a tokenizer, bases, adapters


def make_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.text_tokenizer import EOS, train_byte_level_bpe

    with open(REPO / "examples" / "data" / "support.csv", newline="", encoding="utf-8") as f:
        texts = [row["prompt"] + " " + row["response"] for row in csv.DictReader(f)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_level_bpe(texts, 400, [EOS]),
                                        eos_token=EOS, bos_token=EOS, pad_token=EOS)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_base(folder: Path, tokenizer_folder: Path, **sizes) -> Path:
    """A random GPT-2 saved with its tokenizer, like a pulled base model."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **sizes)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, kind: str, seed: int) -> Path:
    """A PEFT folder whose weights are random: LoRA starts B at zero, which would answer as the base does."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    config = (LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM") if kind == "lora"
              else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "prompt_encoder" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_tokenizer(root / "tokenizer")
    base = make_base(root / "tiny", root / "tokenizer", n_positions=64, n_embd=32, n_layer=2, n_head=2)
    adapters = {"a": make_adapter(base, root / "a", "lora", 1), "b": make_adapter(base, root / "b", "lora", 2),
                "soft": make_adapter(base, root / "soft", "prompt", 3)}
    return root, base, adapters


@pytest.fixture(scope="module")
def catalog(folders):
    from pipeline.serve import load_catalog, template_formatter

    _, base, adapters = folders
    return load_catalog(base, adapters, format_prompt=template_formatter(TEMPLATE))


def alone(base: Path, folder: Path | None):
    """The model as it would be served by itself: a fresh base, with only this adapter."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(base)
    return (PeftModel.from_pretrained(model, folder) if folder else model).eval()


def last_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1]


def formatted_ids(catalog, prompt: str) -> torch.Tensor:
    return catalog.tokenizer(TEMPLATE.format_map({"prompt": prompt}), return_tensors="pt", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the catalog, in process


def test_each_model_answers_as_it_would_alone(folders, catalog):
    _, base, adapters = folders
    ids = formatted_ids(catalog, PROMPT)
    served, reference = {}, {}
    # Out of order and twice over: whatever ran before, selecting a name gives that model.
    for name in ["soft", "a", "base", "b", "a", "soft", "base"]:
        with catalog.selected(name) as module:
            served[name] = last_logits(module, ids)
    for name in catalog.names():
        reference[name] = last_logits(alone(base, adapters.get(name)), ids)
        assert torch.allclose(served[name], reference[name], atol=1e-5), name
    names = catalog.names()
    assert names == ["base", "a", "b", "soft"]
    for i, one in enumerate(names):
        for other in names[i + 1:]:
            assert not torch.allclose(reference[one], reference[other], atol=1e-3), (one, other)


def _is_adapter_weight(name: str) -> bool:
    return "lora_" in name or "prompt_encoder" in name


def test_base_weights_are_held_once(folders, catalog):
    from safetensors import safe_open

    _, base, adapters = folders
    base_ptrs = {n: p.data_ptr() for n, p in catalog.base_model.named_parameters() if not _is_adapter_weight(n)}
    storages = {}
    for name in catalog.names():
        with catalog.selected(name) as module:
            params = list(module.named_parameters())
        # The same tensors whichever model answers: found by address, whatever PEFT's prefix on their names.
        assert {p.data_ptr() for n, p in params if not _is_adapter_weight(n)} == set(base_ptrs.values()), name
        storages.update({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for _, p in params})

    fresh = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in alone(base, None).parameters()}
    adapter_bytes = 0
    for folder in adapters.values():
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            adapter_bytes += sum(f.get_tensor(k).nbytes for k in f.keys())
    # Every parameter storage of every model counted once: exactly one base plus the adapters.
    assert sum(storages.values()) == sum(fresh.values()) + adapter_bytes


def test_usage_counts_and_greedy_repeats(catalog):
    first = catalog.complete("a", PROMPT, max_tokens=6)
    again = catalog.complete("a", PROMPT, max_tokens=6)
    assert first == again
    assert first.prompt_tokens == formatted_ids(catalog, PROMPT).shape[1]
    assert (first.completion_tokens, first.finish_reason) == (6, "length")  # no EOS from random weights
    texts = {name: catalog.complete(name, PROMPT, max_tokens=6).text for name in catalog.names()}
    assert len(set(texts.values())) == 4, texts


def test_sampling_repeats_per_seed_and_differs_across_seeds(catalog):
    one = catalog.complete("b", PROMPT, max_tokens=8, temperature=1.0, seed=11)
    assert catalog.complete("b", PROMPT, max_tokens=8, temperature=1.0, seed=11) == one
    other = catalog.complete("b", PROMPT, max_tokens=8, temperature=1.0, seed=12)
    greedy = catalog.complete("b", PROMPT, max_tokens=8)
    assert len({one.text, other.text, greedy.text}) == 3, (one, other, greedy)
    # The soft prompt's model samples too (no KV cache there).
    assert catalog.complete("soft", PROMPT, max_tokens=4, temperature=0.7, seed=5) == catalog.complete(
        "soft", PROMPT, max_tokens=4, temperature=0.7, seed=5)


def test_concurrent_requests_each_get_their_own_model(catalog):
    from concurrent.futures import ThreadPoolExecutor

    names = catalog.names() * 3
    alone_answers = {name: catalog.complete(name, PROMPT, max_tokens=5) for name in catalog.names()}
    # The server answers each request on its own thread: selecting an adapter and generating with
    # it must not interleave with another request's selection.
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda name: catalog.complete(name, PROMPT, max_tokens=5), names))
    assert answers == [alone_answers[name] for name in names]


def test_stops_at_eos_with_finish_reason_stop(folders, catalog):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from pipeline.serve import Catalog, template_formatter

    _, base, _ = folders
    model = GPT2LMHeadModel.from_pretrained(base)
    greedy = model.generate(input_ids=formatted_ids(catalog, PROMPT), max_new_tokens=1, do_sample=False)[0, -1].item()
    # A model whose generation config names that first greedy token an EOS: it must stop right there.
    model.generation_config.eos_token_id = greedy
    done = Catalog(model, AutoTokenizer.from_pretrained(base), {}, format_prompt=template_formatter(TEMPLATE)).complete(
        "base", PROMPT, 10)
    assert (done.completion_tokens, done.finish_reason) == (1, "stop"), done


def test_prompt_over_the_position_table_is_refused_with_counts(folders, catalog):
    from pipeline.serve import Catalog, RequestRejected, UnknownModel, template_formatter

    # 64 positions, max_tokens 8: base and LoRA read up to 56 prompt tokens, the soft prompt's model 52.
    prompt = next(p for p in (" ".join(["warranty"] * n) for n in range(1, 200))
                  if 53 <= formatted_ids(catalog, p).shape[1] <= 56)
    length = formatted_ids(catalog, prompt).shape[1]
    assert catalog.complete("base", prompt, max_tokens=8).prompt_tokens == length
    assert catalog.complete("a", prompt, max_tokens=8).prompt_tokens == length
    soft_prompt_room = rf"prompt is {length} tokens .* at most 52 \(64 positions - max_tokens 8 - 4 soft prompt tokens\)"
    with pytest.raises(RequestRejected, match=soft_prompt_room) as e:
        catalog.complete("soft", prompt, max_tokens=8)
    assert e.value.param == "prompt"
    with pytest.raises(RequestRejected, match="max_tokens 60 leaves no room") as e:
        catalog.complete("soft", "hi", max_tokens=60)
    assert e.value.param == "max_tokens"
    with pytest.raises(UnknownModel, match="'c' is not served here; served: base, a, b, soft"):
        catalog.complete("c", "hi")

    _, base, _ = folders
    capped = Catalog(alone(base, None), catalog.tokenizer, {}, format_prompt=template_formatter(TEMPLATE),
                     max_prompt_tokens=10)
    with pytest.raises(RequestRejected, match=rf"prompt is {length} tokens .* at most 10 .*max_prompt_tokens 10"):
        capped.complete("base", prompt)


def test_wrong_adapter_folders_fail_before_any_loading(folders, catalog, tmp_path):
    from pipeline.serve import Catalog

    _, base, adapters = folders
    model = alone(base, None)
    with pytest.raises(FileNotFoundError, match=r"adapter 'x': .* has no adapter_config.json"):
        Catalog(model, catalog.tokenizer, {"a": adapters["a"], "x": tmp_path})
    with pytest.raises(ValueError, match="adapter name 'base' is the base model's name"):
        Catalog(model, catalog.tokenizer, {"base": adapters["a"]})
    assert not hasattr(model, "peft_config")  # nothing was attached to the base on the way


# ---------------------------------------------------------------- the request checks and the server, in process


@pytest.mark.parametrize("body, param, words", [
    ([1], None, "JSON object"),
    ({"prompt": "hi"}, "model", "model is required"),
    ({"model": "a"}, "prompt", "prompt must be a string"),
    ({"model": "a", "prompt": ["x", "y"]}, "prompt", "list of one"),
    ({"model": "a", "prompt": [1, 2]}, "prompt", "token-id"),
    ({"model": "a", "prompt": "x", "max_tokens": -1}, "max_tokens", "between 1 and 512, got -1"),
    ({"model": "a", "prompt": "x", "max_tokens": 513}, "max_tokens", "between 1 and 512"),
    ({"model": "a", "prompt": "x", "max_tokens": True}, "max_tokens", "must be an integer"),
    ({"model": "a", "prompt": "x", "max_tokens": 4.0}, "max_tokens", "must be an integer"),
    ({"model": "a", "prompt": "x", "temperature": "hot"}, "temperature", "must be a number, got 'hot'"),
    ({"model": "a", "prompt": "x", "temperature": 2.5}, "temperature", "between 0 and 2"),
    ({"model": "a", "prompt": "x", "temperature": float("nan")}, "temperature", "must be a number"),
    ({"model": "a", "prompt": "x", "seed": "7"}, "seed", "must be an integer"),
    ({"model": "a", "prompt": "x", "n": 3}, "n", "n=3 is not supported"),
    ({"model": "a", "prompt": "x", "stream": True}, "stream", "stream=True is not supported"),
    ({"model": "a", "prompt": "x", "stop": ["\n"]}, "stop", "not supported"),
])
def test_wrong_request_fields_are_named(body, param, words):
    from pipeline.serve.openai_api import ApiError, completion_request

    with pytest.raises(ApiError) as e:
        completion_request(body)
    assert (e.value.status, e.value.param) == (400, param)
    assert words in e.value.message


def test_request_defaults_and_a_one_prompt_list():
    from pipeline.serve.openai_api import CompletionRequest, completion_request

    assert completion_request({"model": "a", "prompt": ["hi"], "n": 1, "stream": False, "stop": None, "user": "u"}) == \
        CompletionRequest("a", "hi", max_tokens=16, temperature=0.0, seed=None)
    assert completion_request({"model": "a", "prompt": "", "max_tokens": 512, "temperature": 2, "seed": 3}) == \
        CompletionRequest("a", "", 512, 2.0, 3)


class _Broken:
    """A catalog whose generation fails the way a bug would."""

    def names(self):
        return ["m"]

    def complete(self, *args):
        raise RuntimeError("tensor on the wrong device\nsecond line of detail")


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body, headers) of one raw HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path)
        headers = {"Content-Length": str(len(body))} if body is not None and headers is None else headers or {}
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null"), dict(response.getheaders())
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    """The server's whole answer to bytes sent as they are, the sending side then closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_failure_inside_generation_is_one_line_500_and_serving_goes_on(capfd):
    from pipeline.serve import make_server

    server = make_server(_Broken(), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        status, body, _ = request(port, "POST", "/v1/completions", json.dumps({"model": "m", "prompt": "hi"}).encode())
        assert status == 500
        assert body["error"]["message"] == "internal error: RuntimeError: tensor on the wrong device"
        assert body["error"]["type"] == "server_error"
        status, body, headers = request(port, "DELETE", "/v1/models")
        assert (status, headers["Allow"]) == (405, "GET")
        status, body, _ = request(port, "HEAD", "/health")  # no do_HEAD: http.server's own refusal, in our shape
        assert status == 501
        # A body shorter than its Content-Length (the client stopped sending), and a request line
        # that is not HTTP at all: refused, in the same error shape.
        short = raw(port, b'POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"model"')
        assert short.startswith(b"HTTP/1.1 400") and b"ended after 8 of its 100 bytes" in short, short
        garbage = raw(port, b"HELLO\r\n\r\n")  # no version: answered as HTTP/0.9 does, the body alone
        assert json.loads(garbage)["error"]["message"] == "Bad request syntax ('HELLO')"
        status, body, _ = request(port, "GET", "/health")
        assert status == 200 and body["models"] == ["m"] and body["rss_bytes"] > 10_000_000
    finally:
        server.shutdown()
        server.server_close()
    log = capfd.readouterr().err
    assert re.search(r"^POST /v1/completions 500 \d+ms$", log, re.MULTILINE), log
    assert "Traceback" in log  # for the operator, not the client
    assert re.search(r"^GET /health 200 \d+ms$", log, re.MULTILINE), log
    assert "HTTP/1.1\" 200" not in log  # http.server's default access lines are replaced


# ---------------------------------------------------------------- servers in subprocesses


class Server:
    def __init__(self, folder: Path, base: Path, adapters: dict[str, Path]):
        folder.mkdir(parents=True)
        self.out, self.err = folder / "stdout.log", folder / "stderr.log"
        args = [sys.executable, "-m", "pipeline.serve", "--base", str(base), "--port", "0", "--prompt-template", TEMPLATE]
        for name, adapter in adapters.items():
            args += ["--adapter", f"{name}={adapter}"]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=err)
        self.port = None

    def wait_until_serving(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.err.read_text()}")
            found = re.search(r"^serving \d+ models at http://127\.0\.0\.1:(\d+)/v1: ", self.out.read_text(), re.MULTILINE)
            if found:
                self.port = int(found.group(1))
                if request(self.port, "GET", "/health")[0] == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"server did not start within {_STARTUP_SECONDS}s:\n{self.err.read_text()}")

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0, timeout=60)

    def health(self) -> dict:
        status, body, _ = request(self.port, "GET", "/health")
        assert status == 200, body
        return body

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, folders):
    """Three servers on one ~26M-parameter base (~105 MB in fp32): bare, with one LoRA, with two.
    Each answers once per model before its resident memory is read, so all are measured alike."""
    root = tmp_path_factory.mktemp("servers")
    tokenizer = folders[0] / "tokenizer"
    base = make_base(root / "base", tokenizer, n_positions=128, n_embd=512, n_layer=8, n_head=8)
    a, b = make_adapter(base, root / "a", "lora", 1), make_adapter(base, root / "b", "lora", 2)
    running = {"base_only": Server(root / "base_only", base, {}), "one": Server(root / "one", base, {"a": a}),
               "two": Server(root / "two", base, {"a": a, "b": b})}
    try:
        deadline = time.monotonic() + _STARTUP_SECONDS
        rss = {}
        for key, server in running.items():
            server.wait_until_serving(deadline)
            client = server.client()
            for name in server.health()["models"]:
                client.completions.create(model=name, prompt=PROMPT, max_tokens=8)
            rss[key] = server.health()["rss_bytes"]
        from safetensors import safe_open

        with safe_open(str(base / "model.safetensors"), "pt") as f:
            base_bytes = sum(f.get_tensor(k).nbytes for k in f.keys())
        yield {**running, "rss": rss, "base_bytes": base_bytes, "base": base}
    finally:
        for server in running.values():
            server.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_openai_client_lists_and_completes(servers):
    from transformers import AutoTokenizer

    server = servers["two"]
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["base", "a", "b"]
    assert all(m.owned_by == "tunepipe" and m.created > 0 for m in models.data)
    assert client.models.retrieve("b").id == "b"

    tokenizer = AutoTokenizer.from_pretrained(servers["base"])
    prompt_tokens = len(tokenizer(TEMPLATE.format_map({"prompt": PROMPT}), add_special_tokens=False)["input_ids"])
    texts = {}
    for name in ("a", "b", "base"):
        done = client.completions.create(model=name, prompt=PROMPT, max_tokens=8)
        assert done.object == "text_completion" and done.model == name and done.id.startswith("cmpl-")
        choice = done.choices[0]
        assert choice.finish_reason in ("stop", "length") and choice.index == 0
        assert done.usage.prompt_tokens == prompt_tokens
        assert done.usage.completion_tokens == 8 if choice.finish_reason == "length" else 1 <= done.usage.completion_tokens <= 8
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        texts[name] = choice.text
    assert len(set(texts.values())) == 3, texts
    assert client.completions.create(model="a", prompt=[PROMPT], max_tokens=8).choices[0].text == texts["a"]

    sampled = [client.completions.create(model="b", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=s).choices[0].text
               for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2], sampled
    assert sampled[0] != texts["b"]


@pytest.mark.integration
@pytest.mark.slow
def test_bad_requests_get_their_4xx_and_serving_goes_on(servers):
    server = servers["two"]
    long_prompt = " ".join(["warranty"] * 300)
    cases = [
        ("POST", "/v1/completions", b"{not json", None, 400, None, "not valid JSON"),
        ("POST", "/v1/completions", {"model": "c", "prompt": "hi"}, None, 404, "model", "'c' is not served here"),
        ("POST", "/v1/completions", {"model": "a", "prompt": long_prompt}, None, 400, "prompt",
         "at most 112 (128 positions - max_tokens 16"),
        ("POST", "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": -1}, None, 400, "max_tokens", "got -1"),
        ("POST", "/v1/completions", {"model": "a", "prompt": "hi", "temperature": "hot"}, None, 400, "temperature", "'hot'"),
        ("POST", "/v1/completions", {"model": "a", "prompt": "hi", "n": 3}, None, 400, "n", "n=3"),
        ("POST", "/v1/completions", {"model": "a", "prompt": "hi", "stream": True}, None, 400, "stream", "stream=True"),
        ("GET", "/v1/completions", None, None, 405, None, "GET is not allowed on /v1/completions; use POST"),
        ("GET", "/v1/chat/completions", None, None, 404, None, "no such path: /v1/chat/completions"),
        ("POST", "/v1/completions", None, {"Content-Length": str(10**10)}, 413, None, "10000000000 bytes is over the limit"),
    ]
    for method, path, body, headers, status, param, words in cases:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        got, answer, _ = request(server.port, method, path, data, headers)
        assert got == status, (path, body, answer)
        error = answer["error"]
        assert words in error["message"] and error["param"] == param and error["type"] == "invalid_request_error", (body, error)
    assert server.health()["models"] == ["base", "a", "b"]
    assert server.process.poll() is None
    log = server.err.read_text()
    assert re.search(r"^POST /v1/completions 413 \d+ms$", log, re.MULTILINE), log
    assert re.search(r"^GET /v1/completions 405 \d+ms$", log, re.MULTILINE), log


@pytest.mark.integration
@pytest.mark.slow
def test_an_adapter_costs_far_less_memory_than_a_base(servers):
    rss, base_bytes = servers["rss"], servers["base_bytes"]
    mb = {key: round(value / 2**20, 1) for key, value in rss.items()}
    numbers = (f"resident MiB: base only {mb['base_only']}, one adapter {mb['one']}, two adapters {mb['two']}; "
               f"base weights {base_bytes / 2**20:.1f} MiB")
    print(numbers)
    # The second adapter (a few hundred KB of LoRA weights) must not bring a second base with it.
    assert rss["two"] - rss["base_only"] < 0.5 * base_bytes + (rss["one"] - rss["base_only"]), numbers
    # Nor the first: PEFT wraps the loaded base, it does not copy it.
    assert rss["one"] - rss["base_only"] < 0.5 * base_bytes, numbers


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_stops_the_server_cleanly(servers):
    server = servers["base_only"]
    assert server.stop() == 0
    assert server.err.read_text().rstrip().endswith("stopped")
    with pytest.raises(OSError):
        request(server.port, "GET", "/health")
