"""The model a run starts from, and how it trains."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.config.base import Section


class ModelConfig(Section):
    # A registry base is identified by its resolved version and manifest digest (train's content
    # fingerprint), not by where the registry lives: a moved registry keeps the cache.
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset({"registry"})

    name: str = "gpt2"
    """`init: pretrained`: the Hugging Face model id or local folder to load, or `registry://MODEL@ALIAS` (or `@VERSION`) for a published version (then `init` defaults to pretrained). Ignored with `init: scratch`."""
    init: Literal["scratch", "pretrained"] = "scratch"
    """`scratch`: a fresh model of the size below with a BPE tokenizer trained on the data; `pretrained`: load `name` (weights and tokenizer)."""
    registry: str | None = None
    """Where a `registry://` name is looked up: a folder or s3:// URL; default: `registry.url`."""
    n_layer: int = Field(2, gt=0)
    """Transformer blocks (scratch only)."""
    n_head: int = Field(2, gt=0)
    """Attention heads (scratch only)."""
    n_embd: int = Field(64, gt=0)
    """Hidden size (scratch only)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout for residual, embedding and attention (scratch only)."""
    vocab_multiple: int = Field(64, gt=0)
    """Scratch only: the embedding and output head get the tokenizer's vocabulary rounded up to a multiple of this (GPU matmuls run on whole tiles; GPT-2's 50,257 -> 50,304). The extra ids are never targets and are suppressed in generation. 1 = no padding."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel. `auto`: FlashAttention-2 on a CUDA GPU in bf16/fp16 where the `flash_attn` package is installed (packed `bins` blocks then run as variable-length sequences, no padding), else PyTorch's SDPA (which masks the examples of a `bins` block from each other)."""

    @model_validator(mode="before")
    @classmethod
    def _registry_names_are_pretrained(cls, data: Any) -> Any:
        # A published model is a checkpoint to load: `name: registry://m@x` alone should do.
        if isinstance(data, dict) and str(data.get("name", "")).startswith("registry://") and "init" not in data:
            data = {**data, "init": "pretrained"}
        return data

    @model_validator(mode="after")
    def _registry_name_is_a_reference(self) -> "ModelConfig":
        if self.name.startswith("registry://"):
            model, sep, label = self.name[len("registry://"):].partition("@")
            if not sep or not model or not label or "/" in model:
                raise ValueError(f"model.name {self.name!r}: expected registry://MODEL@ALIAS or registry://MODEL@VERSION "
                                 "(the registry is model.registry, default registry.url)")
            if self.init != "pretrained":
                # A config that says scratch and names a published model is ambiguous: say so, never guess.
                raise ValueError(f"model.name {self.name!r} is a published model to start from, but model.init is "
                                 f"{self.init!r}: set model.init=pretrained")
        return self

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        return self


class TrainConfig(Section):
    # How and where a run trains, never what it trains: the node count and processes per node
    # are hashed only as their product (`world_size`), so 2 nodes x 1 process shares its cache
    # with 1 node x 2 processes (they train bit-identical weights).
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset({
        "save_every_steps", "keep_last_checkpoints", "log_every_steps", "nnodes", "nproc_per_node",
        "rdzv_endpoint", "rdzv_id", "rdzv_port", "launcher", "checkpoint_dir", "max_concurrent",
    })

    seed: int = 0
    """Seed for initialisation, dropout and data order."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine decays to lr * min_lr_ratio at max_steps."""
    max_steps: int | None = Field(200, gt=0)
    """Optimizer steps to train for; null with `epochs`, which then sets it."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the train split, instead of max_steps (set max_steps to null): max_steps becomes ceil(epochs x train rows / global batch)."""
    micro_batch_size: int = Field(8, gt=0)
    """Blocks per rank per forward pass."""
    grad_accum_steps: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step. Global batch = micro_batch_size x grad_accum_steps x world size."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradient clipping norm."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 on a CUDA device that supports it, fp32 elsewhere. `fp16` (CUDA only) adds dynamic loss scaling."""
    group_by_length: bool = False
    """Rows padded per batch (packing none, classification, seq2seq): draw them in groups of 64 sorted by
    length, so batches pad less. Faster; on small data it can cost some validation loss (docs/benchmarks.md)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass: less memory, about a third more compute."""
    compile: bool = False
    """`torch.compile` the model (in place: same weights, same checkpoint names). The first step waits for the
    compiler (about 45 s for a tiny GPT-2 on 2 CPU cores, seconds from its on-disk cache on a rerun), later steps
    run faster (1.25x there). Works with DDP, LoRA, gradient checkpointing and exact resume; off by default until
    measured on GPU (docs/benchmarks.md)."""
    fused_loss: bool = True
    """Causal LM and preference: compute the output head and the cross-entropy together, a chunk of positions at a
    time (train/fused_loss.py), so the step never holds the [tokens x vocabulary] fp32 logits (GPT-2's head over a
    16k-token step: 3.3 GB, and as much again for their gradient). The same loss to 1e-5. Not under ZeRO-3 or prompt
    tuning, which then use the plain head."""
    fused_activation: bool = True
    """Run GPT-2's `gelu_new` (eight tensor operations in Python) as torch's one-kernel tanh GELU while training:
    the same function to 2.4e-7, about 9% of a small GPT-2's CPU step saved (train/fast_activations.py). The saved
    model is unchanged."""
    cpu_matmul: Literal["auto", "torch", "onednn"] = "auto"
    """CPU only: the library for the fp32 linear layers and the fused loss's matmuls. torch's (MKL) runs its
    AVX-512 kernels only on Intel CPUs; oneDNN picks by instruction set: a GPT-2 layer about 2x faster, forward and
    backward, on an AMD EPYC (train/cpu_matmul.py). `auto`: oneDNN on a non-Intel CPU with AVX-512, else torch. Not with train.compile
    or DeepSpeed."""
    fast_cpu_dropout: bool = False
    """Opt-in CPU-only speed-up: draw dropout masks 16 bits per element instead of with torch's
    bernoulli (25% of a small GPT-2's step on 2 cores) and run attention dropout in our own math
    path: 1.2-1.4x faster steps, other masks than torch's (the drop probability is rounded to a
    multiple of 1/65536). Ignored on CUDA, which always uses torch's dropout (train/cpu_dropout.py)."""

    method: Literal["full", "freeze", "lora", "qlora", "prompt_tuning", "adapters"] = "full"
    """What trains. `full`: every weight; `freeze`: the top `trainable_blocks` blocks and the head;
    `lora` / `qlora` (4-bit base, CUDA + bitsandbytes): low-rank adapters (PEFT); `prompt_tuning`:
    soft prompt vectors (PEFT); `adapters`: bottleneck adapters after each block (train/methods/bottleneck.py)."""
    trainable_blocks: int = Field(2, ge=0)
    """`freeze`: how many of the top transformer blocks train (with the head); embeddings stay frozen."""
    layer_lr_decay: float = Field(1.0, gt=0.0, le=1.0)
    """Layer-wise learning rates: block i of n trains at lr x decay^(n - i), embeddings at lr x decay^(n + 1). 1.0 = off."""
    head_lr: float | None = Field(None, gt=0.0)
    """Learning rate of the output head (LM head, classifier); default: `lr`."""
    lora_r: int = Field(8, gt=0)
    """LoRA rank."""
    lora_alpha: int = Field(16, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | None = None
    """Module names LoRA wraps; default: the attention projections of the architecture (PEFT's table, else a search)."""
    num_virtual_tokens: int = Field(20, gt=0)
    """`prompt_tuning`: soft prompt length."""
    prompt_init_text: str | None = None
    """`prompt_tuning`: initialise the soft prompt from this text's token embeddings (e.g. "Summarize the following"); default: random."""
    adapter_size: int = Field(16, gt=0)
    """`adapters`: bottleneck width of each adapter."""
    dpo_beta: float = Field(0.1, gt=0.0)
    """Preference (DPO): how far the policy may move from the reference model; the loss is
    -log sigmoid(beta x (chosen log-ratio - rejected log-ratio)) (Rafailov et al. 2023). Higher: stays closer."""

    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """Data parallelism: `ddp` (torch DistributedDataParallel) or `deepspeed` (ZeRO, see deepspeed_config)."""
    deepspeed_config: str = "zero2"
    """`zero1`, `zero2`, `zero3`, `zero3_offload` (files in deepspeed_configs/) or a path to a JSON; its `auto` values are filled from this section."""

    eval_every_steps: int | None = Field(None, gt=0)
    """Validate every N steps (validation loss; accuracy for classification) and log it; default: never during training."""
    eval_every: Literal["epoch"] | None = None
    """`epoch`: validate at the end of every epoch (instead of eval_every_steps); the steps of an epoch are ceil(train rows / global batch)."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop when the validation metric has not improved for this many validations (needs eval_every_steps)."""
    early_stopping_metric: Literal["eval_loss", "accuracy"] = "eval_loss"
    """Validation metric early stopping watches (`accuracy`: classification only)."""
    eval_batches: int = Field(20, gt=0)
    """Validation batches (of micro_batch_size rows) scored at each validation during training."""
    tensorboard: bool = True
    """Write TensorBoard event files (loss, lr, grad norm, tokens/s, MFU on GPU) under the train output's `tensorboard/`."""
    save_every_steps: int = Field(50, gt=0)
    """Write a resumable checkpoint every N steps (and at the end)."""
    keep_last_checkpoints: int = Field(2, gt=0)
    """Older complete checkpoints beyond this many are deleted; the newest complete one never is."""
    log_every_steps: int = Field(10, gt=0)
    """Log loss, learning rate and throughput every N steps."""
    nproc_per_node: int = Field(1, gt=0)
    """Processes `torchrun` starts on each node (one per GPU; on CPU, gloo ranks)."""
    nnodes: int = Field(1, gt=0)
    """Nodes the run trains on. World size = nnodes x nproc_per_node. With `launcher: local` and more
    than one node, start the same run on every node with the same `rdzv_endpoint` (docs/clusters.md)."""
    launcher: Literal["local", "slurm", "kubernetes"] = "local"
    """`local`: torchrun on this machine; `slurm`: the train stage submits a batch job (the `slurm:`
    section), follows it, and commits what it trained; `kubernetes`: the stage adopts the model
    that the Job from `tunepipe k8s manifest` committed (docs/clusters.md)."""
    rdzv_endpoint: str | None = None
    """HOST:PORT of the rendezvous (node 0's address) when `launcher: local` and nnodes > 1.
    Slurm and Kubernetes jobs set it themselves (their first node, port `rdzv_port`)."""
    rdzv_id: str | None = None
    """Rendezvous id shared by every node of one run; default: derived from the train stage's fingerprint."""
    rdzv_port: int = Field(29500, gt=0, lt=65536)
    """Port of the rendezvous on the first node, for Slurm and Kubernetes jobs."""
    checkpoint_dir: str | None = None
    """Where resumable checkpoints go: a folder every node sees, or a URL (s3://bucket/ckpt); a
    run's checkpoints are kept under `<checkpoint_dir>/train/<fingerprint>/`. Default: the stage's
    scratch beside the workdir (on S3 for an s3:// workdir), so a requeued job on any node resumes."""

    max_concurrent: int = Field(1, gt=0)
    """Train stages (of any config) that may run at once among the Prefect runs of one work pool;
    the rest queue (Prefect global concurrency limit `tunepipe-train-<pool>`). 1: two overlapping
    scheduled runs never share the GPUs. Runs of one config also never train at once into one
    checkpoint folder, whatever this says (a lock beside the checkpoints)."""

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_the_default_steps(cls, data: Any) -> Any:
        # `epochs: 3` alone means three passes; the default max_steps (200) must not also apply.
        if isinstance(data, dict) and data.get("epochs") is not None and "max_steps" not in data:
            data = {**data, "max_steps": None}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError(f"train.epochs ({self.epochs:g}) and train.max_steps ({self.max_steps}) are both set: "
                             "set one of them (train.max_steps=null to train by epochs)")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("train.max_steps is null: set it, or set train.epochs")
        if self.eval_every == "epoch" and self.eval_every_steps is not None:
            raise ValueError("train.eval_every is epoch and train.eval_every_steps is set: set one of them")
        return self

    def for_rows(self, train_rows: int, world_size: int) -> "TrainConfig":
        """This section with `epochs` and `eval_every: epoch` turned into steps for a train split of
        `train_rows` rows: what the training loop, its schedule and its progress read. An epoch is
        ceil(rows / global batch) steps (the last batch of an epoch is completed from the next)."""
        per_epoch = max(1, math.ceil(train_rows / (self.micro_batch_size * self.grad_accum_steps * world_size)))
        update: dict[str, Any] = {}
        if self.epochs is not None:
            update["max_steps"] = max(1, math.ceil(self.epochs * per_epoch))
        if self.eval_every == "epoch":
            update["eval_every_steps"] = per_epoch
        return self.model_copy(update=update) if update else self

    @property
    def validates(self) -> bool:
        return self.eval_every_steps is not None or self.eval_every is not None

    @property
    def started_on_every_node(self) -> bool:
        """Each node runs its own `tunepipe` for its share of one job (launcher local, several
        nodes): the processes of one run then must not wait for each other's lock or slot."""
        return self.launcher == "local" and self.nnodes > 1

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def fingerprint_dict(self) -> dict[str, Any]:
        return {**super().fingerprint_dict(), "world_size": self.world_size}
