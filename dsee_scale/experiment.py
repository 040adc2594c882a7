"""One experiment = one YAML file with sections; CLI `section.key=value` overrides any key.

model:      ModelConfig    (models.py)
dsee:       DSEEConfig     (adapters/config.py)
data:       DataConfig     train / eval files, block size
train:      TrainConfig    steps, batch sizes, lr, schedule, precision, ...
eval:       EvalConfig
checkpoint: CheckpointConfig
prune:      PruneConfig    what launchers/prune.py removes (see pruning/run.py)
deepspeed:  path of the engine JSON (ds_configs/)
nvme_path:  where ZeRO's NVMe offload swaps (needed by zero3_offload_nvme.json)
output_dir: checkpoints, TensorBoard events, logs
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .adapters.config import DSEEConfig
from .config import apply_overrides, from_dict, load_yaml
from .errors import ConfigError
from .models import ModelConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass
class DataConfig:
    # local files (globs allowed), or the built-in source "python_stdlib" (the standard
    # library's .py files, split by module), or a `datasets` hub name. format text: every file
    # is a UTF-8 document whatever its suffix, except .json / .jsonl / .parquet (text_field);
    # prompt_completion / chat: records from .jsonl / .json / .parquet (see data/formats.py)
    format: Literal["text", "prompt_completion", "chat"] = "text"
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    source: Literal["python_stdlib"] | None = None
    hub_dataset: str | None = None  # a datasets hub name, where a network exists
    hub_train_split: str = "train"
    hub_eval_split: str | None = None
    text_field: str = "text"
    prompt_field: str = "prompt"  # prompt_completion
    completion_field: str = "completion"
    messages_field: str = "messages"  # chat: a list of {role, content}
    chat_template: str | None = None  # chat: a Jinja file; default: the tokenizer's template
    packing: bool = True  # samples share rows (kept apart by position ids); false: one per row
    overlong: Literal["drop", "truncate", "error"] = "drop"  # samples longer than block_size
    block_size: int = 256
    heldout_percent: int = 10  # python_stdlib: share of modules held out for eval
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = None
    cache_dir: str | None = None  # tokenized blocks; default: ~/.cache/dsee_scale/data

    def validate(self, section: str = "data") -> None:
        given = [
            k
            for k, v in (
                ("train_files", self.train_files),
                ("source", self.source),
                ("hub_dataset", self.hub_dataset),
            )
            if v
        ]
        if len(given) != 1:
            raise ConfigError(
                f"{section}: give exactly one of train_files (with eval_files), "
                f"source: python_stdlib, hub_dataset (got {', '.join(given) or 'none'})"
            )
        if self.block_size < 2:
            raise ConfigError(f"{section}.block_size: got {self.block_size}, must be >= 2")
        if not 0 < self.heldout_percent < 100:
            raise ConfigError(f"{section}.heldout_percent: must be in 1..99")


@dataclass
class TrainConfig:
    max_steps: int | None = None  # optimizer steps; or epochs
    epochs: float | None = None
    batch_size: int = 8  # global: micro_batch_size x ranks x accumulation
    micro_batch_size: int = 4  # per rank, per forward
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0
    log_every: int = 1
    histogram_every: int = 50
    collective_timeout_s: int = 1800  # a rank that stops answering ends the job after this
    stop_at_step: int | None = None  # end this run (with a checkpoint) at this step; the
    # schedule still runs to max_steps, so `--resume` continues it (e.g. Slurm time slices)
    max_nonfinite_steps: int = 5  # a step whose loss or gradient is NaN/inf is skipped; this many
    # skipped in a row stop the run (the last good checkpoint stays `latest`)

    def validate(self, section: str = "train") -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError(f"{section}: give exactly one of max_steps, epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{section}.max_steps: got {self.max_steps}, must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"{section}.epochs: got {self.epochs}, must be > 0")
        for key in ("batch_size", "micro_batch_size", "log_every", "histogram_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{section}.{key}: got {getattr(self, key)}, must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{section}.batch_size: {self.batch_size} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size}"
            )
        if self.lr <= 0:
            raise ConfigError(f"{section}.lr: got {self.lr}, must be > 0")
        if self.collective_timeout_s < 1:
            raise ConfigError(f"{section}.collective_timeout_s: must be >= 1")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError(f"{section}.stop_at_step: got {self.stop_at_step}, must be >= 1")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"{section}.max_nonfinite_steps: got {self.max_nonfinite_steps}, must be >= 1")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"{section}: warmup_steps, grad_clip and weight_decay must be >= 0")


@dataclass
class EvalConfig:
    every: int = 50  # optimizer steps; also at the end
    batch_size: int = 4  # per rank
    generate: int = 0  # held-out samples answered greedily at each eval for the task metric
    max_new_tokens: int = 64  # per generated answer
    show: int = 3  # generated answers written to TensorBoard's text tab

    def validate(self, section: str = "eval") -> None:
        if self.every < 1 or self.batch_size < 1:
            raise ConfigError(f"{section}: every and batch_size must be >= 1")
        if self.generate < 0 or self.max_new_tokens < 1 or self.show < 0:
            raise ConfigError(f"{section}: generate and show must be >= 0, max_new_tokens >= 1")


@dataclass
class CheckpointConfig:
    every: int = 100  # optimizer steps; also at the end
    keep_last: int = 2
    universal_timeout_s: int = 7200  # resuming on another world size: the conversion's own limit
    # the frozen base in every checkpoint (save), or referenced by its source files' sha256
    # (from_source: a model.path of safetensors or a GGUF; checkpoint/base.py); auto: from_source
    # where possible
    frozen_base: Literal["auto", "save", "from_source"] = "auto"

    def validate(self, section: str = "checkpoint") -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ConfigError(f"{section}: every and keep_last must be >= 1")
        if self.universal_timeout_s < 1:
            raise ConfigError(f"{section}.universal_timeout_s: must be >= 1 (seconds)")


def parse_nm(text: str) -> tuple[int, int]:
    """ "2:4" -> (2, 4); ValueError unless 0 < N < M."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"N:M pattern {text!r}: write it as two integers, e.g. 2:4") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {text!r}: needs 0 < N < M")
    return n, m


@dataclass
class DistillConfig:
    """`prune.distill`: knowledge distillation from the unpruned tuned model while re-tuning
    (the teacher runs forward only, partitioned under ZeRO-3 like the student). The loss is
    lm_weight x cross-entropy + kl_weight x T^2 x KL(teacher_T || student_T), the KL taken over
    the label tokens with both distributions softened by temperature T (Hinton et al. 2015)."""

    kl_weight: float = 0.0  # 0: no distillation (no teacher is built)
    lm_weight: float = 1.0
    temperature: float = 2.0

    def validate(self, section: str = "prune.distill") -> None:
        if self.kl_weight < 0 or self.lm_weight < 0:
            raise ConfigError(f"{section}: kl_weight and lm_weight must be >= 0")
        if self.kl_weight == 0 and self.lm_weight == 0:
            raise ConfigError(f"{section}: kl_weight and lm_weight are both 0; nothing would train")
        if self.temperature <= 0:
            raise ConfigError(f"{section}.temperature: got {self.temperature}, must be > 0")


@dataclass
class PruneConfig:
    """The `prune:` section."""

    kind: Literal["structured", "unstructured"] = "structured"
    heads_per_layer: int = 0  # q heads removed per layer (per kv group with gqa: per_group)
    gqa: Literal["per_group", "kv_groups"] = "per_group"
    channels_per_layer: int = 0  # MLP channels removed per layer
    head_score: Literal["dsee", "weight", "dsee+weight", "activation", "taylor", "fisher"] = "dsee"
    channel_score: Literal["weight", "activation", "taylor", "fisher"] = "weight"
    ratio: float = 0.5  # unstructured: share of the chosen weights set to zero
    scope: Literal["global", "layer", "row"] = "global"  # unstructured: where scores are compared
    nm: str | None = None  # unstructured N:M pattern, e.g. "2:4" (ratio must then be 1 - N/M)
    score: Literal["magnitude", "abs", "wabs", "wanda", "sparsegpt"] = "wabs"  # unstructured
    calibration_batches: int = 4  # activation / wanda scores: micro-batches of the train data
    targets: list[str] = field(default_factory=list)  # unstructured: patterns (default: all block linears)
    # unstructured: the re-tuned update is applied only where the pruned W is non-zero, so the
    # merged (exported) model keeps the sparsity; false: the update refills its rows on merge
    keep_zeros: bool = True
    # recovery: fresh DSEE adapters for the re-tuning (a dsee section, e.g. every linear of each
    # block); the tuned update is then merged into W before W is pruned. Unset: the tuned
    # adapters (cut to the pruned shapes) continue training.
    recovery: DSEEConfig | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self, section: str = "prune") -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"{section}.ratio: got {self.ratio}, must be in [0, 1)")
        if self.heads_per_layer < 0 or self.channels_per_layer < 0:
            raise ConfigError(f"{section}: heads_per_layer and channels_per_layer must be >= 0")
        if self.calibration_batches < 1:
            raise ConfigError(f"{section}.calibration_batches: must be >= 1")
        if self.nm is not None:
            try:
                n, m = parse_nm(str(self.nm))
            except ValueError as e:
                raise ConfigError(f"{section}.nm: {e}") from None
            if self.kind != "unstructured":
                raise ConfigError(
                    f"{section}.nm: an N:M pattern is unstructured pruning; set {section}.kind: unstructured"
                )
            if abs(self.ratio - (1 - n / m)) > 1e-9:
                raise ConfigError(
                    f"{section}.ratio: got {self.ratio}, but {section}.nm {self.nm} prunes {1 - n / m:g} "
                    f"(set ratio: {1 - n / m:g}, or leave nm unset)"
                )
        if self.recovery is not None and self.recovery.support == "gradient":
            raise ConfigError(
                f"{section}.recovery.support: gradient is not available for recovery adapters "
                "(allowed: grebsmo, svd, magnitude, random)"
            )
        if self.kind == "structured" and not (self.heads_per_layer or self.channels_per_layer):
            raise ConfigError(
                f"{section}: structured pruning needs heads_per_layer or channels_per_layer > 0"
            )


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dsee: DSEEConfig = field(default_factory=DSEEConfig)
    data: DataConfig | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prune: PruneConfig | None = None
    deepspeed: str = "ds_configs/zero3.json"
    nvme_path: str | None = None
    output_dir: str = "runs/experiment"


def load_experiment(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    data = apply_overrides(load_yaml(path), overrides or [])
    if "model" not in data:
        raise ConfigError(f"{path}: the model section is required")
    exp = from_dict(ExperimentConfig, data, "")
    out = Path(exp.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"output_dir: {str(out)!r} is an existing file, not a directory; choose another output_dir"
        )
    ds = Path(exp.deepspeed)
    if not ds.is_file() and not ds.is_absolute() and (REPO / ds).is_file():
        exp.deepspeed = str(REPO / ds)  # the shipped ds_configs/, from any working directory
    elif not ds.is_file():
        raise ConfigError(
            f"deepspeed: {exp.deepspeed!r} does not exist "
            "(ds_configs/ has zero2.json, zero3.json, zero3_offload_cpu.json, "
            "zero3_offload_nvme.json)"
        )
    return exp
