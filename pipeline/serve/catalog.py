"""The base model held once and every adapter on it; what the server answers from.

    catalog = load_catalog(Path("base"), {"support": Path("support/model"), "docs": Path("docs/model")},
                           format_prompt=template_formatter("### Question:\\n{prompt}\\n### Answer:\\n"))
    catalog.names()                                   # ["base", "support", "docs"]
    done = catalog.complete("support", "How long is the warranty?", max_tokens=32)
    done.text, done.prompt_tokens, done.completion_tokens, done.finish_reason    # "stop" at EOS, else "length"

Adapters are PEFT folders (adapter_config.json + adapter_model.safetensors), LoRA or prompt tuning
or both. Each PEFT type becomes one PeftModel (`load_adapters`) over the same base module, because
PEFT cannot hold two types in one PeftModel. LoRA writes its layers into the base's modules, so
every other answer (the base's, a soft prompt's) runs with LoRA disabled; a soft prompt only wraps
the base and needs nothing switched off. Either way the base weights exist once.

Selecting an adapter and generating with it are one step under one lock: `set_adapter` and
`disable_adapter` change the shared module, so two requests must never interleave them.
"""

from __future__ import annotations

import secrets
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from pipeline.train.methods.prompt_tuning import virtual_tokens


class UnknownModel(LookupError):
    """A model name the catalog does not hold."""


class RequestRejected(ValueError):
    """A request the catalog cannot answer as asked (the client's to fix); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    """Tokens of the prompt after `format_prompt`, as the model read them (a soft prompt's not counted)."""
    completion_tokens: int
    """Tokens generated, the EOS that ended them included."""
    finish_reason: str
    """"stop": the model ended with EOS; "length": max_tokens ran out first."""


def template_formatter(template: str) -> Callable[[str], str]:
    """`format_prompt` for a preprocess `prompt_template`: filled exactly as preprocess filled it in training."""
    return lambda prompt: template.format_map({"prompt": prompt})


class Catalog:
    """The base model held once and every adapter on it; what the server answers from.

    `base_model` becomes the catalog's: LoRA layers are added to its modules. `adapters`: name ->
    PEFT adapter folder, served in that order after `base_name`. `format_prompt` turns a request's
    prompt into the template the models were tuned on (default: unchanged): one callable for every
    model, or a dict of them by model name (each registry version has its own template).
    `max_prompt_tokens` caps prompts further than the position table does.
    """

    def __init__(self, base_model: nn.Module, tokenizer, adapters: dict[str, Path], *, base_name: str = "base",
                 format_prompt: Callable[[str], str] | dict[str, Callable[[str], str]] | None = None,
                 max_prompt_tokens: int | None = None):
        if base_name in adapters:
            raise ValueError(f"adapter name {base_name!r} is the base model's name; rename one of them")
        self.base_name = base_name
        self.base_model = base_model.eval()
        self.tokenizer = tokenizer
        self._formats = format_prompt if isinstance(format_prompt, dict) else {}
        self._format_all = None if isinstance(format_prompt, dict) else format_prompt
        self.max_prompt_tokens = max_prompt_tokens
        config = base_model.config
        # The same position limit evaluate's `generate` keeps inside; None: the model has no table.
        self.positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        eos = {tokenizer.eos_token_id, *_as_list(getattr(getattr(base_model, "generation_config", None), "eos_token_id", None))}
        self.eos_ids = sorted(i for i in eos if i is not None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        self._lock = threading.Lock()
        self._weight_group = None  # the PeftModel whose layers live inside the base's modules (LoRA)
        self._group_of: dict[str, nn.Module] = {}
        for (_, prompt_learning), folders in _by_peft_type(adapters).items():
            from pipeline.train.methods import load_adapters  # imports peft: only when there are adapters

            group = load_adapters(self.base_model, folders)
            if not prompt_learning:
                self._weight_group = group
            self._group_of.update(dict.fromkeys(folders, group))
        self._names = [base_name, *adapters]

    def format_prompt(self, model: str, prompt: str) -> str:
        """`prompt` in the template `model` was tuned on."""
        formatter = self._formats.get(model) or self._format_all
        return formatter(prompt) if formatter is not None else prompt

    def names(self) -> list[str]:
        """`base_name` first, then the adapters in the order given."""
        return list(self._names)

    @contextmanager
    def selected(self, model: str) -> Iterator[nn.Module]:
        """The module that answers for `model`, with its adapter active and the lock held throughout."""
        if model not in self._names:
            raise UnknownModel(f"model {model!r} is not served here; served: {', '.join(self._names)}")
        group = self._group_of.get(model)
        with self._lock, ExitStack() as stack:
            if self._weight_group is not None and group is not self._weight_group:
                stack.enter_context(self._weight_group.disable_adapter())
            if group is None:
                yield self.base_model
            else:
                group.set_adapter(model)
                yield group

    def complete(self, model: str, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                 seed: int | None = None) -> Completion:
        """Continue `prompt` (after `format_prompt`) with up to `max_tokens` tokens from `model`.

        temperature 0: greedy. Above 0: sampled from softmax(logits / temperature) with a generator
        seeded from `seed` (random when None), so one seed gives one answer.
        """
        if max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if temperature < 0:
            raise RequestRejected(f"temperature must be at least 0, got {temperature}", "temperature")
        with self.selected(model) as module:
            ids = self.tokenizer(self.format_prompt(model, prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
            virtual = virtual_tokens(module)
            self._check_room(model, ids.shape[1], max_tokens, virtual)
            sampler = [] if temperature == 0 else [_SeededSampling(temperature, secrets.randbits(63) if seed is None else seed)]
            with torch.no_grad():
                out = module.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    # Sampling is done by _SeededSampling (generate takes no torch.Generator): it leaves
                    # one token possible, which greedy then picks. Greedy otherwise.
                    do_sample=False,
                    logits_processor=sampler,
                    eos_token_id=self.eos_ids or None,
                    pad_token_id=self.pad_id,
                    use_cache=not virtual,  # a soft prompt breaks PEFT's KV cache: see evaluate/stage.py generate
                )
        new = out[0, ids.shape[1]:].tolist()
        stopped = bool(new) and new[-1] in self.eos_ids
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Completion(text, ids.shape[1], len(new), "stop" if stopped else "length")

    def _check_room(self, model: str, prompt_tokens: int, max_tokens: int, virtual: int) -> None:
        if prompt_tokens == 0:
            raise RequestRejected("prompt is empty after formatting; there is nothing to continue", "prompt")
        room = None
        if self.positions is not None:
            room = self.positions - max_tokens - virtual
            if room < 1:
                raise RequestRejected(f"max_tokens {max_tokens} leaves no room for a prompt: model {model!r} reads at most "
                                      f"{self.positions} positions ({virtual} taken by its soft prompt)", "max_tokens")
        if self.max_prompt_tokens is not None:
            room = self.max_prompt_tokens if room is None else min(room, self.max_prompt_tokens)
        if room is not None and prompt_tokens > room:
            # Never cut: a truncated question gets a confident answer to a different question.
            why = (f"{self.positions} positions - max_tokens {max_tokens} - {virtual} soft prompt tokens"
                   if self.positions is not None else "")
            cap = f"max_prompt_tokens {self.max_prompt_tokens}" if self.max_prompt_tokens is not None else ""
            raise RequestRejected(f"prompt is {prompt_tokens} tokens after formatting; model {model!r} takes at most "
                                  f"{room} ({'; '.join(filter(None, (why, cap)))})", "prompt")


def load_catalog(base: Path, adapters: dict[str, Path], tokenizer: Path | None = None, **kw) -> Catalog:
    """A Catalog from folders: `base` (a transformers model folder or hub id), each adapter's PEFT
    folder, the tokenizer (default: the base's folder); `kw` go to Catalog."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return Catalog(AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(tokenizer or base),
                   {name: Path(folder) for name, folder in adapters.items()}, **kw)


def _by_peft_type(adapters: dict[str, Path]) -> dict[tuple[str, bool], dict[str, Path]]:
    """(PEFT type, whether it is a prompt-learning type) -> {name: folder}, checked before any is loaded."""
    groups: dict[tuple[str, bool], dict[str, Path]] = {}
    for name, folder in adapters.items():
        if not (Path(folder) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {name!r}: {folder} has no adapter_config.json "
                                    "(a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)")
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(folder)
        if config.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"adapter {name!r} was trained for {config.task_type}; completions need a CAUSAL_LM adapter")
        groups.setdefault((str(config.peft_type.value), config.is_prompt_learning), {})[name] = Path(folder)
    weight_types = [peft_type for peft_type, prompt_learning in groups if not prompt_learning]
    if len(weight_types) > 1:
        # Each would wrap the base's modules in its own layers: one base cannot hold both.
        raise ValueError(f"adapters of {' and '.join(weight_types)} both change the base's weights and cannot share "
                         "one base; serve them from two servers")
    return groups


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


class _SeededSampling:
    """A logits processor that samples the next token from softmax(scores / temperature) with its
    own torch.Generator and masks every other token: reproducible per seed, and unaffected by the
    global RNG or by other requests."""

    def __init__(self, temperature: float, seed: int):
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # log_softmax first: its maximum is 0, so a tiny temperature sends the rest to -inf, never to NaN.
        probs = torch.softmax(torch.log_softmax(scores.float(), dim=-1) / self.temperature, dim=-1)
        chosen = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)
