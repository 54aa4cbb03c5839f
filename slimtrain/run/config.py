"""The trainer's typed configuration: nested dataclasses, a YAML file, ``key=value`` overrides.

Every field carries its documentation in ``metadata["help"]`` (the CLI's ``--help-config``
prints it) and, where the value is one of a fixed set, ``metadata["choices"]``. Loading goes
YAML -> dict -> :func:`from_dict`, which rejects unknown keys and badly typed values with a
message naming the key, the value and what is allowed; ``__post_init__`` checks ranges.
The resolved config (:func:`to_dict`) is saved in every checkpoint and in ``config.yaml``
in the run directory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key, the value and the fix."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 numbers: PyYAML (YAML 1.1) reads ``1e-8`` (no dot) as a string, which
    then reaches an optimizer's ``eps <= 0`` check as ``str``."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text):
    """``yaml.safe_load`` with scientific notation read as numbers (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def setting(default, help: str, choices: tuple | None = None, **kw):
    """A config dataclass field with its help text (printed by ``--help-config``) and choices."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def require(cond: bool, key: str, value, need: str) -> None:
    """Raise :class:`ConfigError` naming ``key``, its ``value`` and what it ``need``s unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value!r}: {need}")


@dataclass
class ModelConfig:
    name: str = setting("llama-20m", "a preset (llama-20m, llama-60m, llama-130m, llama-350m, llama-1b, llama-7b: "
                   "the GaLore paper's Llama shapes, vocabulary from the tokenizer) or a local Hugging Face "
                   "model directory / config.json (weights are loaded when the directory has them)")
    dtype: str = setting("float32", "parameter dtype; bf16 weights need an optimizer that keeps fp32 state",
                    choices=("float32", "bfloat16"))
    activation_checkpointing: bool = setting(False, "recompute decoder layers in backward (less memory, ~30% slower)")
    max_position_embeddings: int = setting(0, "override the preset's context length (0: max(preset, data.seq_len))")
    init_device: str = setting("cpu", "cpu: build the model eagerly (in fp32, then cast); meta: build it on the meta "
                          "device and fill it tensor by tensor straight into model.dtype / INT8 (seeded per "
                          "tensor, or read lazily from the directory's safetensors), never holding fp32 weights",
                          choices=("cpu", "meta"))
    int8_weights: bool = setting(False, "store every linear layer but lm_head as INT8 codes + group scales "
                            "(QuantLinear, for optim.name=qgalore_adamw8bit), made while building")
    int8_group_size: int = setting(256, "values per fp32 scale of the INT8 weights (a power of two)")
    gguf_file: str = setting("", "a GGUF file inside the model.name directory (e.g. SmolLM2-135M-Instruct.Q4_1.gguf): "
                        "weights are dequantized to model.dtype by transformers, the tokenizer comes from it too")

    def __post_init__(self):
        require(bool(self.name), "model.name", self.name, "give a preset name or a model directory")
        g = self.int8_group_size
        require(g >= 2 and g & (g - 1) == 0, "model.int8_group_size", g, "must be a power of two >= 2 (e.g. 256)")
        require(self.max_position_embeddings >= 0, "model.max_position_embeddings", self.max_position_embeddings,
               "must be >= 0")


@dataclass
class DataConfig:
    files: list = setting([], "local text / .jsonl / .json / .parquet files (globs allowed); empty: the built-in "
                     "English corpus (Python's own documentation, read from pydoc_data at run time)")
    format: str = setting("auto", "file format; auto picks it from the first file's extension (.tsv: tab-separated with "
                     "a header, as GLUE ships; a directory: datasets.load_from_disk)",
                     choices=("auto", "text", "json", "parquet", "csv", "tsv", "disk"))
    text_field: str = setting("text", "the column holding the text in json / parquet files")
    tokenizer: str = setting("auto", "'auto' (the model's own tokenizer when model.name is a local directory that has one "
                        "or model.gguf_file is set, else 'byte'), 'byte' (built-in byte-level tokenizer, 256 bytes + "
                        "<eos>, no download) or a local Hugging Face tokenizer directory")
    seq_len: int = setting(128, "tokens per training block (lm: documents joined with <eos> and packed; sft / "
                      "classification: the longest example, longer ones are truncated and counted)")
    task: str = setting("lm", "lm: next-token loss on packed text; sft: prompt/response pairs (or chat messages), loss "
                   "on the response only; classification: a prompt template plus one label word per class, loss "
                   "on the label word, accuracy = argmax over the label words' logits (docs/finetune.md)",
                   choices=("lm", "sft", "classification"))
    eval_files: list = setting([], "sft / classification: held-out files scored by evaluate (empty: every k-th row of "
                          "data.files, k = 1 / data.eval_fraction)")
    template: str = setting("", "classification: prompt template with {column} fields, e.g. '{sentence} It was' "
                       "(empty: '{<text_fields[0]>}'); sft: prompt template (empty: '{<prompt_field>}')")
    text_fields: list = setting([], "classification: the text column(s) (empty: 'sentence', or 'sentence1,sentence2' "
                           "when the file has them, else 'text')")
    label_field: str = setting("label", "classification: the label column")
    label_words: dict = setting({}, "classification: label value -> label word (one token with its leading space), "
                           "e.g. {0: ' terrible', 1: ' great'}")
    prompt_field: str = setting("prompt", "sft: the prompt column")
    response_field: str = setting("response", "sft: the response column")
    messages_field: str = setting("messages", "sft: a column of chat messages ([{role, content}, ...]) rendered with the "
                             "tokenizer's chat template; used when the prompt column is absent; the last "
                             "assistant message is the response")
    truncation_side: str = setting("left", "sft / classification: which end of an over-long prompt is cut (left keeps "
                              "the words next to the answer); every cut example is counted in a warning",
                              choices=("left", "right"))
    max_eval_examples: int = setting(0, "sft / classification: score at most this many held-out examples (0: all)")
    eval_fraction: float = setting(0.05, "share of documents held out for evaluation (at least one document)")
    max_eval_blocks: int = setting(64, "evaluate on at most this many held-out blocks")

    def __post_init__(self):
        if isinstance(self.files, str):
            self.files = [self.files]
        require(all(isinstance(f, str) for f in self.files), "data.files", self.files, "must be a list of paths")
        require(self.seq_len >= 2, "data.seq_len", self.seq_len, "must be >= 2")
        require(0.0 < self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction,
               "must be strictly between 0 and 1 (e.g. 0.05)")
        require(self.max_eval_blocks >= 1, "data.max_eval_blocks", self.max_eval_blocks, "must be >= 1")
        for key in ("eval_files", "text_fields"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])
        require(self.max_eval_examples >= 0, "data.max_eval_examples", self.max_eval_examples, "must be >= 0")


@dataclass
class OptimConfig:
    name: str = setting("adamw", "optimizer name from slimtrain.optim.registry (validated against "
                   "available_optimizers(); e.g. adamw, galore_adamw, galore_adafactor, bnb_adamw8bit)")
    lr: float = setting(2e-3, "peak learning rate (after warmup)")
    weight_decay: float = setting(0.0, "decoupled weight decay")
    args: dict = setting({}, "extra keyword arguments for the optimizer factory, e.g. optim.args.rank=64 "
                    "optim.args.update_proj_gap=50 optim.args.betas=[0.9,0.95]")

    def __post_init__(self):
        require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", self.lr, "must be a positive number")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")


def optimizer_kwargs(optim: OptimConfig) -> dict:
    """The keyword arguments a registry factory gets for ``optim``: the learning rate, the
    weight decay and ``optim.args`` (which win). One function for every kind of run, so the
    trainer and the federated clients cannot read the optim section differently."""
    return {"lr": optim.lr, "weight_decay": optim.weight_decay, **optim.args}


@dataclass
class TrainConfig:
    steps: int = setting(150, "optimizer steps")
    batch_size: int = setting(8, "sequences per micro-batch per rank")
    grad_accum: int = setting(1, "micro-batches per optimizer step (global batch = batch_size * grad_accum * ranks)")
    warmup_steps: int = setting(10, "linear warmup steps")
    min_lr_ratio: float = setting(0.1, "cosine decays to lr * min_lr_ratio at the last step")
    max_grad_norm: float = setting(1.0, "global gradient-norm clipping (0: off; never used by zeroth-order optimizers)")
    bf16: bool = setting(False, "bf16 autocast for forward/backward (fp32 parameters and optimizer)")
    seed: int = setting(0, "seeds model init, data order and every RNG")
    eval_every: int = setting(100, "evaluate every N steps (0: only at the end)")
    log_every: int = setting(1, "write a metrics line every N steps")
    nan_policy: str = setting("stop", "on a non-finite loss: stop (naming the checkpoint to resume from) or skip the "
                         "step", choices=("stop", "skip"))
    max_nan_skips: int = setting(10, "with nan_policy=skip, stop after this many consecutive skipped steps")
    divergence_margin: float = setting(2.0, "stop when an eval loss exceeds the initial eval loss (measured before "
                                  "the first step) by more than this many nats, or is non-finite (0: off)")
    progress: bool = setting(True, "show a tqdm progress bar on rank 0")
    allow_lr_change: bool = setting(False, "on --resume, apply a changed optim.lr / train.warmup_steps / "
                               "train.min_lr_ratio to the restored schedule (refused otherwise; also --allow-lr-change)")

    def __post_init__(self):
        for key in ("steps", "batch_size", "grad_accum", "log_every", "max_nan_skips"):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        require(0 <= self.seed < 2**32, "train.seed", self.seed, "must be an integer in [0, 2**32)")
        for key in ("warmup_steps", "eval_every"):
            require(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0 (0 turns it off)")
        require(self.divergence_margin >= 0 and math.isfinite(self.divergence_margin), "train.divergence_margin",
               self.divergence_margin, "must be a number >= 0 (0 turns the check off)")


@dataclass
class DistConfig:
    engine: str = setting("torch", "torch: slimtrain's data parallelism (gradients all-reduced after backward, "
                     "optimizer state sharded by whole tensors at zero_stage 1/2); ddp: torch's "
                     "DistributedDataParallel (GaLore matrices send projected gradients through its comm hook); "
                     "fsdp: FSDP2 (fully_shard per decoder layer: weights, gradients and state sharded; optimizers "
                     "that declare dtensor_params); deepspeed: a DeepSpeed engine wraps model and optimizer",
                          choices=("torch", "ddp", "fsdp", "deepspeed"))
    fsdp_cpu_offload: bool = setting(False, "dist.engine=fsdp: keep the sharded parameters, gradients and optimizer "
                                     "state in host memory (FSDP2's CPUOffloadPolicy)")
    zero_stage: int = setting(0, "optimizer-state sharding. engine=torch: slimtrain's whole-tensor sharding (1: state "
                         "sharded, gradients all-reduced; 2: gradients also reduced to the owner only), for every "
                         "optimizer. engine=deepspeed: DeepSpeed ZeRO for shape-independent optimizers (3 shards "
                         "parameters too); GaLore-family optimizers take slimtrain's sharding at 1/2 instead of "
                         "ZeRO's flat partitions and refuse 3", choices=(0, 1, 2, 3))
    lowrank_sync: bool = setting(True, "GaLore-family optimizers exchange projected gradients (r x n instead of m x n; "
                            "the full gradient only on projector-refresh steps); train.max_grad_norm then clips the "
                            "norm of what the optimizer sees (projected gradients), the same with 1 or N ranks")
    deepspeed_config: str = setting("", "optional DeepSpeed JSON merged under the config slimtrain builds "
                               "(batch sizes, clipping and ZeRO stage always come from this config)")

    def __post_init__(self):
        require(self.zero_stage < 3 or self.engine == "deepspeed", "dist.zero_stage", self.zero_stage,
               "stage 3 (parameter sharding) needs dist.engine=deepspeed; slimtrain's own sharding covers 1 and 2")


@dataclass
class CheckpointConfig:
    every: int = setting(100, "save a checkpoint every N steps (0: only at the end)")
    keep: int = setting(2, "keep the newest N checkpoints")

    def __post_init__(self):
        require(self.every >= 0, "checkpoint.every", self.every, "must be >= 0")
        require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclass
class ExportConfig:
    dir: str = setting("", "after the run, write a Hugging Face directory here (save_pretrained: safetensors, config, "
                  "generation config, the tokenizer); empty: no export. Also: slimtrain export CHECKPOINT OUT")
    dtype: str = setting("float32", "dtype of the exported weights", choices=("float32", "bfloat16"))


@dataclass
class Config:
    output_dir: str = setting("runs/slimtrain", "run directory: checkpoints/, metrics.jsonl, tensorboard/, "
                         "loss.png, summary.json, config.yaml")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ---------------------------------------------------------------------------- building
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value, typ, choices):
    """``value`` as ``typ`` (a YAML-parsed or string value), or a ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            value = value.lower() in ("true", "yes", "1", "on")
        require(isinstance(value, bool), key, value, "expected true or false")
    elif typ is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        require(isinstance(value, int) and not isinstance(value, bool), key, value, "expected an integer")
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "expected a number")
        value = float(value)
    elif typ is str:
        require(isinstance(value, (str, int, float)) and not isinstance(value, bool), key, value, "expected a string")
        value = str(value)
    elif typ is list or origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        require(isinstance(value, list), key, value, "expected a list, e.g. [a.txt, b.txt] or a,b")
    elif typ is dict or origin is dict:
        require(isinstance(value, dict), key, value, "expected a mapping")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r}: allowed choices are {list(choices)}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={data!r}: expected a mapping of keys")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise ConfigError(f"unknown config key {prefix + str(name)!r}; known keys"
                              f"{' in ' + repr(prefix.rstrip('.')) if prefix else ''}: {sorted(fields)}")
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, typ, fields[name].metadata.get("choices"))
    try:
        return cls(**kwargs)
    except TypeError as e:  # a value of a type __post_init__ could not compare
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def from_dict(data: dict | None, root=Config):
    """Build a ``root`` (default :class:`Config`) from nested plain data (unknown keys / bad
    values -> ConfigError). ``slimtrain federated`` passes its own root."""
    return _build(root, data or {}, "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Short forms for the keys people type most: ``optim=galore_adamw zero_stage=2 steps=100``,
# ``slimtrain federated clients=20 rounds=3``. An alias applies where the root has its section.
ALIASES = {"optim": "optim.name", "model": "model.name", "lr": "optim.lr", "steps": "train.steps",
           "zero_stage": "dist.zero_stage", "engine": "dist.engine", "output": "output_dir",
           "clients": "federated.clients", "rounds": "federated.rounds", "strategy": "federated.strategy",
           "local_steps": "federated.local_steps", "participation": "federated.participation",
           "compression": "federated.compression", "epsilon": "federated.dp.target_epsilon"}


def apply_override(data: dict, assignment: str, root=Config) -> None:
    """Apply one ``a.b.c=value`` assignment to nested ``data`` (value parsed as YAML), checking
    the path against the dataclasses under ``root``; a bare key in :data:`ALIASES` stands for
    its full path when ``root`` has that section."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not key=value (e.g. train.steps=100)")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    sections = {f.name for f in dataclasses.fields(root)}
    if key in ALIASES and ALIASES[key].split(".")[0] in sections:
        key = ALIASES[key]
    if not key:
        raise ConfigError(f"override {assignment!r} has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw
    # Only optim.args is free-form; elsewhere the path must name dataclass fields, so a typo in
    # an intermediate part is reported with the section's known keys.
    parts = key.split(".")
    node, cls = data, root
    for i, part in enumerate(parts[:-1]):
        if cls is not None:
            names = {f.name: f for f in dataclasses.fields(cls)}
            if part not in names:
                where = ".".join(parts[:i])
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}; known keys"
                                  f"{' in ' + repr(where) if where else ''}: {sorted(names)}")
            typ = _hints(cls)[part]
            cls = typ if dataclasses.is_dataclass(typ) else None
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif not isinstance(child, dict):  # e.g. `train: 5` in the file: report it, never drop it
            raise ConfigError(f"{'.'.join(parts[: i + 1])}={child!r}: expected a mapping of keys "
                              f"(e.g. {parts[i]}: {{{parts[i + 1]}: ...}}), so {key}= cannot be applied to it")
        node = child
    if cls is not None and _hints(cls).get(parts[-1]) is str and not isinstance(value, str):
        # A string key takes the text as typed when YAML reads something else: a prompt template
        # such as 'Review: {sentence}' must not become a mapping (quoted YAML still works).
        value = raw
    node[parts[-1]] = value


def load_config(path: str | None = None, overrides: list[str] | tuple = (), root=Config):
    """A YAML file (optional) plus ``key=value`` overrides, validated into a ``root`` (default
    :class:`Config`)."""
    data: dict = {}
    if path:
        try:
            with open(path) as fh:
                data = yaml_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping (key: value), got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment, root)
    return from_dict(data, root)


# ---------------------------------------------------------------------------- resume
# What a resumed `train` may change (applied for real and recorded in config.yaml): run length,
# cadences, logging, stop policies, clipping, precision, export, and the distribution layout (the data
# order continues; the trainer warns where the run stops being bit-identical). The schedule keys
# need train.allow_lr_change. Everything else (model, data incl. seq_len, optimizer name / args /
# weight decay, seed) defines the run and is refused.
TRAIN_RESUME_MAY_CHANGE = ("output_dir", "train.steps", "train.eval_every", "train.log_every", "train.progress",
                           "train.nan_policy", "train.max_nan_skips", "train.divergence_margin", "train.max_grad_norm",
                           "train.bf16", "train.batch_size", "train.grad_accum", "train.allow_lr_change", "checkpoint",
                           "dist", "model.activation_checkpointing", "export")
TRAIN_RESUME_SCHEDULE = ("optim.lr", "train.warmup_steps", "train.min_lr_ratio")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def compare_resume_config(saved: dict, new: dict, may_change=TRAIN_RESUME_MAY_CHANGE,
                          schedule=TRAIN_RESUME_SCHEDULE, allow_schedule_change: bool = False
                          ) -> tuple[list[str], list[str]]:
    """Compare the config saved in a checkpoint with the one a ``--resume`` was started with.

    Returns ``(refused, changed)``, each a list of ``"key: old -> new"``: ``refused`` the keys
    that define the run (anything not under ``may_change``, plus ``schedule`` unless
    ``allow_schedule_change``), ``changed`` the differences that will be applied. Both configs
    are nested plain dicts (:func:`to_dict`); a key only one of them has counts as a change.
    """
    a, b = _flatten(saved), _flatten(new)
    refused, changed = [], []
    for key in sorted(set(a) | set(b)):
        old, now = a.get(key, "<unset>"), b.get(key, "<unset>")
        if old == now or (isinstance(old, (list, tuple)) and isinstance(now, (list, tuple)) and list(old) == list(now)):
            continue
        line = f"{key}: {old!r} -> {now!r}"
        if _covered(key, may_change) or (allow_schedule_change and _covered(key, schedule)):
            changed.append(line)
        else:
            refused.append(line + (" (needs train.allow_lr_change=true / --allow-lr-change)"
                                   if _covered(key, schedule) else ""))
    return refused, changed


def check_resume_config(path: str, saved: dict, new: dict, **kw) -> list[str]:
    """:func:`compare_resume_config`, raising a ConfigError that lists every refused difference;
    returns the changes that will be applied."""
    refused, changed = compare_resume_config(saved, new, **kw)
    if refused:
        raise ConfigError(f"--resume {path}: the checkpoint's run was configured differently; these keys cannot "
                          "change mid-run: " + "; ".join(refused) + ". Resume with the checkpoint's values (see its "
                          "config in config.yaml), or start a new run with output=<another directory>")
    return changed


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per key: ``name (type, default): help [choices]`` (the CLI's --help-config)."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            lines += describe(typ, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tname = typ.__name__ if isinstance(typ, type) else str(typ)
        choices = f" choices={list(f.metadata['choices'])}" if "choices" in f.metadata else ""
        lines.append(f"  {prefix}{f.name} ({tname}, default {default!r}): {f.metadata.get('help', '')}{choices}")
    return lines


__all__ = ["Config", "ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "DistConfig", "CheckpointConfig",
           "ExportConfig", "ConfigError", "load_config", "from_dict", "to_dict", "apply_override", "describe",
           "optimizer_kwargs", "require", "setting"]
