"""The whole pipeline's config, what each row must hold (`RowSpec`), and which keys a run ignores.

A key that the chosen task, template, method, strategy or init ignores is inactive: it is left
out of its stage's fingerprint (changing it must not throw away a valid cache) and, when a user
set it, `ignored_settings` names it so the run can say so once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from pipeline.config.base import Section
from pipeline.config.cluster import KubernetesConfig, SlurmConfig
from pipeline.config.data import DataConfig, PreprocessConfig, SampleConfig, TokenizeConfig
from pipeline.config.orchestration import PrefectConfig
from pipeline.config.publish import EvaluateConfig, RegistryConfig
from pipeline.config.train import ModelConfig, TrainConfig


class RowSpec(Section):
    """Derived from the config, never written by users: what each ingested row must hold for this
    task. Ingest checks these columns and sample dedups on them, so this is what their fingerprints
    hash (not the whole preprocess section: editing a template must not re-ingest)."""

    task: str
    template: str
    """The row layout: the preprocess template for causal_lm, else the task itself (which ignores templates)."""
    columns: dict[str, str]
    """Role (prompt, response, ...) -> column name, for the roles this task and template read."""
    optional: tuple[str, ...] = ()
    """Roles whose column may be absent or empty (the instruction template's input)."""

    @property
    def required_columns(self) -> list[str]:
        return [c for role, c in self.columns.items() if role not in self.optional]


class ReferenceSpec(Section):
    """Derived, never written by users: what preference tuning's reference model is beyond the
    model section. The reference stage hashes this instead of the train section, so a second DPO
    run with another beta or learning rate reuses the reference log-probabilities."""

    seed: int | None
    """A scratch initialisation's seed (train.seed); None for a pretrained model."""
    extra_positions: int
    """Positions a scratch model gets for a soft prompt (they change its initial weights)."""
    precision: str
    """train.precision: the forward's dtype decides the log-probabilities' last digits."""


PREFERENCE_TEMPLATES = ("prompt_response", "chat")


def _role_fields(task: str, template: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """Role -> the DataConfig field naming its column, and the optional roles."""
    if task == "preference":
        return {"prompt": "prompt_column", "chosen": "chosen_column", "rejected": "rejected_column"}, ()
    if task == "classification":
        return {"text": "text_column", "label": "label_column"}, ()
    if task == "seq2seq":
        return {"source": "text_column", "target": "target_column"}, ()
    if template == "prompt_response":
        return {"prompt": "prompt_column", "response": "response_column"}, ()
    if template == "instruction":
        return {"instruction": "instruction_column", "input": "input_column", "output": "output_column"}, ("input",)
    if template == "chat":
        return {"messages": "messages_column"}, ()
    return {"text": "text_column"}, ()


_TEMPLATE_FIELDS = {  # preprocess fields each causal LM template reads
    "prompt_response": ("prompt_template", "response_template"),
    "instruction": ("instruction_template", "instruction_template_no_input"),
    "chat": (),
    "text": (),
}
_METHOD_FIELDS = {  # train fields only these methods read
    "lora_r": ("lora", "qlora"), "lora_alpha": ("lora", "qlora"), "lora_dropout": ("lora", "qlora"),
    "lora_target_modules": ("lora", "qlora"), "num_virtual_tokens": ("prompt_tuning",),
    "prompt_init_text": ("prompt_tuning",), "adapter_size": ("adapters",), "trainable_blocks": ("freeze",),
}


class PipelineConfig(Section):
    task: Literal["causal_lm", "classification", "seq2seq", "preference"] = "causal_lm"
    """What the model learns: `causal_lm` (next-token / instruction SFT), `classification` (text -> label), `seq2seq` (source -> target), `preference` (DPO on prompt, chosen, rejected: a causal LM learns to prefer the chosen answer; the `prompt_response` or `chat` template)."""
    data: DataConfig = DataConfig()

    sample: SampleConfig = SampleConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    slurm: SlurmConfig = SlurmConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    prefect: PrefectConfig = PrefectConfig()

    @model_validator(mode="before")
    @classmethod
    def _registry_base_defaults_to_our_registry(cls, data: Any) -> Any:
        """`model.name: registry://m@x` looks in `registry.url` unless model.registry says otherwise."""
        if not isinstance(data, dict):
            return data
        model, registry = data.get("model"), data.get("registry")
        url = registry.get("url") if isinstance(registry, dict) else getattr(registry, "url", None)
        url = url or RegistryConfig.model_fields["url"].default
        if isinstance(model, dict) and str(model.get("name", "")).startswith("registry://") and not model.get("registry"):
            return {**data, "model": {**model, "registry": url}}
        if isinstance(model, ModelConfig) and model.name.startswith("registry://") and not model.registry:
            return {**data, "model": model.model_copy(update={"registry": url})}
        return data

    @model_validator(mode="after")
    def _train_options_agree(self) -> "PipelineConfig":
        t = self.train
        if t.early_stopping_patience is not None and not t.validates:
            raise ValueError("train.early_stopping_patience needs train.eval_every_steps or train.eval_every (how often to validate)")
        if self.tokenize.truncation == "prompt" and self.task not in ("causal_lm", "preference"):
            raise ValueError(f"tokenize.truncation 'prompt' cuts a causal LM example's prompt; task is {self.task!r} "
                             "(use right, left or drop)")
        if self.tokenize.truncation == "prompt" and not self.tokenize.mask_prompt:
            raise ValueError("tokenize.truncation 'prompt' finds the prompt by its masked labels: it needs tokenize.mask_prompt true")
        if self.task == "preference" and self.preprocess.template not in PREFERENCE_TEMPLATES:
            raise ValueError(f"preprocess.template {self.preprocess.template!r}: task preference reads prompt, chosen and rejected "
                             f"columns with one of {list(PREFERENCE_TEMPLATES)}")
        if t.early_stopping_metric == "accuracy" and self.task != "classification":
            raise ValueError(f"train.early_stopping_metric 'accuracy' needs task classification (task is {self.task!r})")
        if t.launcher == "local" and t.nnodes > 1 and not t.rdzv_endpoint:
            raise ValueError(f"train.nnodes is {t.nnodes} with train.launcher local: set train.rdzv_endpoint to node 0's "
                             "HOST:PORT and start the run on every node, or use train.launcher slurm")
        return self

    @property
    def row_spec(self) -> RowSpec:
        layout = self.preprocess.template if self.task == "causal_lm" else self.task
        if self.task == "preference":
            layout = "preference_chat" if self.preprocess.template == "chat" else "preference"
        fields, optional = _role_fields(self.task, self.preprocess.template)
        columns = {role: getattr(self.data, field) for role, field in fields.items()}
        return RowSpec(task=self.task, template=layout, columns=columns, optional=optional)

    @property
    def reference_spec(self) -> ReferenceSpec:
        scratch = self.model.init == "scratch"
        extra = self.train.num_virtual_tokens if scratch and self.train.method == "prompt_tuning" else 0
        return ReferenceSpec(seed=self.train.seed if scratch else None, extra_positions=extra, precision=self.train.precision)

    def inactive_keys(self) -> dict[str, str]:
        """Dotted key -> why this config's run ignores it."""
        out: dict[str, str] = {}
        t, m = self.train, self.model
        used_columns = set(_role_fields(self.task, self.preprocess.template)[0].values())
        for field in DataConfig.model_fields:
            if field.endswith("_column") and field not in used_columns:
                why = f"preprocess.template is {self.preprocess.template}" if self.task == "causal_lm" else f"task is {self.task}"
                out[f"data.{field}"] = why
        template_fields = {f for fields in _TEMPLATE_FIELDS.values() for f in fields}
        if self.task not in ("causal_lm", "preference"):
            for field in ("template", *sorted(template_fields)):
                out[f"preprocess.{field}"] = f"task is {self.task} (templates are for causal_lm)"
        else:
            for field in sorted(template_fields - set(_TEMPLATE_FIELDS[self.preprocess.template])):
                out[f"preprocess.{field}"] = f"preprocess.template is {self.preprocess.template}"
        if m.init == "pretrained":
            out["tokenize.vocab_size"] = "model.init is pretrained (the model's own tokenizer is used)"
            for field in ("n_layer", "n_head", "n_embd", "dropout", "vocab_multiple"):
                out[f"model.{field}"] = "model.init is pretrained (the checkpoint sets the architecture)"
        else:
            out["model.name"] = "model.init is scratch (a fresh GPT-2 or T5 of model.n_layer x n_embd)"
        if m.init != "pretrained" or not m.name.startswith("registry://"):
            out["model.registry"] = "model.name is not a registry:// name"
        if self.task != "preference":
            out["train.dpo_beta"] = f"task is {self.task} (DPO is task preference)"
            out["evaluate.min_reward_accuracy"] = f"task is {self.task} (a preference gate)"
        else:
            out["tokenize.packing"] = "task is preference (pairs are never packed)"
        for field, methods in _METHOD_FIELDS.items():
            if t.method not in methods:
                out[f"train.{field}"] = f"train.method is {t.method}"
        if self.task not in ("causal_lm", "preference"):
            out["train.fused_loss"] = f"task is {self.task} (the fused loss is the causal LM head's)"
        elif t.method == "prompt_tuning":
            out["train.fused_loss"] = "train.method is prompt_tuning (its virtual positions come first: the plain head is used)"
        if t.strategy != "deepspeed":
            out["train.deepspeed_config"] = f"train.strategy is {t.strategy}"
        else:
            out["train.cpu_matmul"] = "train.strategy is deepspeed (ZeRO-3 replaces the linear function with its own)"
        if t.compile:
            out["train.cpu_matmul"] = "train.compile is on (inductor picks its own kernels)"
        if not t.validates:
            out["train.eval_batches"] = "train.eval_every_steps is not set (no validation during training)"
        if t.early_stopping_patience is None:
            out["train.early_stopping_metric"] = "train.early_stopping_patience is not set"
        if t.launcher != "local" or t.nnodes == 1:
            out["train.rdzv_endpoint"] = f"train.launcher is {t.launcher} (the job sets it)" if t.launcher != "local" else "train.nnodes is 1"
        if t.launcher != "slurm":
            for field in SlurmConfig.model_fields:
                out[f"slurm.{field}"] = f"train.launcher is {t.launcher}"
        if t.launcher != "kubernetes":
            for field in KubernetesConfig.model_fields:
                out[f"kubernetes.{field}"] = f"train.launcher is {t.launcher} (the section is read by `tunepipe k8s manifest`)"
        return out

    def fingerprint_section(self, name: str) -> dict[str, Any]:
        """The part of section `name` that its stage's fingerprint hashes: inactive keys left out."""
        inactive = {key.split(".", 1)[1] for key in self.inactive_keys() if key.startswith(name + ".")}
        return {k: v for k, v in getattr(self, name).fingerprint_dict().items() if k not in inactive}

    def disappointing_settings(self) -> list[str]:
        """Settings that run but will not do what their user expects: said once, before training."""
        lines = []
        t, packing = self.train, self.tokenize.packing
        if t.method == "prompt_tuning" and self.task == "causal_lm" and packing != "none":
            # PEFT puts the virtual tokens in front of each row the model is given: a packed block
            # of several examples (or part of one), not each example as prompt tuning intends.
            lines.append(f"train.method prompt_tuning with tokenize.packing {packing}: the soft prompt is placed once in front "
                         f"of each {self.tokenize.block_size}-token block, which holds several examples or part of one, not "
                         "in front of every example; set tokenize.packing=none to place it per example")
        return lines

    def ignored_settings(self) -> list[str]:
        """One line per key the user set (in the YAML or with --set) that this run ignores."""
        lines = []
        for key, why in self.inactive_keys().items():
            section, field = key.split(".", 1)
            if field in getattr(self, section).model_fields_set:
                lines.append(f"{key} is set but ignored: {why}; it is not part of the cache key")
        return lines
