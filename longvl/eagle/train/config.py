"""The trainer's configuration: dataclasses filled from one YAML file plus dotted command-line overrides.

`load_config("demo", ["--stages.0.steps=5", "--stages.1.lr=1e-4"])` reads `longvl/eagle/configs/demo.yaml`
(or any path), applies the overrides in order and validates the whole result before anything is built.
Values of overrides are parsed as YAML scalars, so `--kernels.enabled=false` is a bool and
`--stages.0.lr=1e-4` a float. Every mistake raises `ConfigError`, one line that names the key, the bad value
and what is allowed; `python -m longvl.eagle.train --help` lists every key with its type, default and meaning.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = ("auto", "bfloat16", "float32")
CP_ALGORITHMS = ("auto", "ring", "allgather", "ulysses", "hybrid_ring", "hybrid_allgather")
# Query / KV heads of the named model sizes (a pretrained folder's config.json says its own).
SIZE_HEADS = {"tiny": (4, 2), "eagle25-8b": (28, 4)}


class ConfigError(ValueError):
    """A configuration mistake, said in one line: the key, the bad value, what is allowed."""


def option(default, meaning: str, **kwargs):
    """A config field with its one-line meaning (shown by --help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": meaning}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": meaning}, **kwargs)


@dataclasses.dataclass
class ModelConfig:
    """Which Eagle model to build."""
    size: str = option("tiny", "named size with random weights: tiny (demo, tests) or eagle25-8b")
    pretrained: str | None = option(None, "a local Eagle checkpoint folder in the released layout (overrides size)")
    dtype: str = option("auto", "compute dtype: auto (bfloat16 on a GPU, float32 on CPU), bfloat16 or float32")
    reduce_dtype: str = option("float32", "gradient reduction dtype across ranks: float32 or bfloat16")


@dataclasses.dataclass
class DataConfig:
    """Where packed training samples come from (longvl/eagle/data: mixture -> offline index -> packs)."""
    source: str = option("synthetic", "synthetic (generated into dir on first use) or mixture (dir/mixture.yaml)")
    dir: str = option("outputs/demo/data", "the data folder")
    tokenizer: str | None = option(None, "a local tokenizer folder; null: the built-in tiny tokenizer (tiny model)")
    num_samples: int = option(64, "synthetic records to generate")
    num_workers: int = option(0, "loader worker processes per rank (spawned); 0 loads in the training process")
    index_workers: int = option(0, "processes planning the offline index; 0 plans in rank 0's process")
    seed: int = option(0, "data order seed")


@dataclasses.dataclass
class StageConfig:
    """One stage of progressive training."""
    name: str = option("stage", "a label for logs and metrics")
    max_length: int = option(32768, "tokens per packed sequence, before context-parallel sharding")
    cp: int = option(1, "context-parallel degree (ranks sharing one sequence); data parallel = world / cp")
    ulysses: int = option(1, "Ulysses share of cp (cp = ulysses x ring); must divide cp")
    cp_algorithm: str = option("auto", "ring, allgather, ulysses, hybrid_ring, hybrid_allgather or auto")
    steps: int | None = option(None, "optimizer steps in this stage (give steps or tokens)")
    tokens: int | None = option(None, "token budget: steps = ceil(tokens / (max_length x data parallel))")
    lr: float = option(2e-5, "peak learning rate")
    warmup_fraction: float = option(0.03, "share of the stage's steps with linear warmup, in [0, 1)")
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of lr, in [0, 1]")
    max_frames: int = option(128, "video frame cap")
    max_tiles: int = option(12, "image tile cap")


@dataclasses.dataclass
class OptimConfig:
    """AdamW."""
    betas: tuple[float, float] = option((0.9, 0.999), "Adam betas, two numbers in [0, 1)")
    eps: float = option(1e-8, "Adam epsilon, > 0")
    weight_decay: float = option(0.05, "decoupled weight decay (matrices only), >= 0")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 turns clipping off")


@dataclasses.dataclass
class MemoryConfig:
    """Activation memory."""
    activation_checkpointing: str = option("full", "none, full (every layer) or selective (every ac_every-th)")
    ac_every: int = option(2, "layer stride of selective checkpointing, >= 1")
    offload_activations: bool = option(False, "move checkpointed hidden states to CPU memory on a side stream")
    offload_params: bool = option(False, "keep parameters, gradients and the optimizer step on CPU (FSDP2)")
    tiled_mlp_tokens: int = option(0, "run each LLM MLP over sequence chunks of this many tokens, recomputed "
                                      "per chunk in backward (exact; 0: off)")
    vision_micro_batch: int = option(0, "tiles per vision-tower call (0: all of a rank's tiles at once)")


@dataclasses.dataclass
class KernelsConfig:
    """Our Triton kernels, put into the model by longvl.kernels.apply_kernels."""
    enabled: bool = option(True, "use the Triton kernels")
    on_cpu: bool = option(False, "also on CPU, through Triton's interpreter (exact, about 30x slower)")
    rms_norm: bool = option(True, "fused RMSNorm")
    rope: bool = option(True, "fused rotary embedding")
    swiglu: bool = option(True, "fused SwiGLU MLP")
    linear_cross_entropy: bool = option(True, "fused lm-head + cross-entropy (no logits in memory)")
    loss_chunking: str = option("tokens", "fused loss work split: tokens (fastest) or vocab (least memory)")
    lm_head_grad_dtype: str = option(
        "float32", "lm-head gradient summed over token chunks in float32 (exact) or in the weight dtype (less memory)")


@dataclasses.dataclass
class CheckpointConfig:
    """Checkpoints and the final export."""
    dir: str = option("outputs/demo/checkpoints", "checkpoint folder (shared storage across nodes)")
    interval: int = option(0, "save every N steps, >= 0 (0: only at stage boundaries and the end)")
    async_save: bool = option(True, "write in the background where the backend allows it")
    keep: int = option(2, "complete checkpoints kept on disk, >= 1")
    resume: bool = option(True, "continue from the newest complete checkpoint in dir")
    export_hf: bool = option(False, "write a Hugging Face model folder (dir/hf) at the end")


@dataclasses.dataclass
class MetricsConfig:
    """Logs, metrics and plots."""
    dir: str = option("outputs/demo/metrics", "metrics folder (metrics.jsonl, bad_samples.jsonl, plot)")
    log_every: int = option(1, "log every N steps, >= 1")
    tensorboard: bool = option(True, "mirror metrics to TensorBoard when the package is installed")
    progress_bar: bool = option(True, "show a progress bar")
    plot: bool = option(True, "PNG of loss and throughput at the end")
    peak_tflops: float | None = option(None, "per-GPU dense bf16 peak for MFU; null: from the device name")


@dataclasses.dataclass
class FaultsConfig:
    """Fault handling."""
    max_consecutive_nonfinite: int = option(5, "stop after this many steps in a row with a non-finite loss, >= 1")


@dataclasses.dataclass
class TrainConfig:
    seed: int = option(0, "seed of the model's random initialisation")
    deterministic: bool = option(False, "deterministic GPU kernels: reruns and resumes give bitwise-identical "
                                        "losses, at some speed cost")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    stages: list[StageConfig] = dataclasses.field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    kernels: KernelsConfig = dataclasses.field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    faults: FaultsConfig = dataclasses.field(default_factory=FaultsConfig)


# ---------------------------------------------------------------- building from YAML
def _build(cls, data, where: str):
    """Build dataclass `cls` from a YAML mapping, recursing into nested dataclasses and stage lists."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or 'root'} must be a mapping of keys, got {data!r:.60}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            path = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
            if cls is not StageConfig and key in {f.name for f in dataclasses.fields(StageConfig)}:
                hint = f"; {key} is set per stage: --stages.N.{key} (N = 0, 1, ...)"
            raise ConfigError(f"unknown config key {path}{hint} (keys of {where or 'the root'}: {', '.join(names)})")
    values = {}
    for key, value in data.items():
        hint, path = hints[key], f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value if value is not None else {}, path)
        elif key == "stages":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"config key stages = {value!r:.60} must be a non-empty list of stages")
            values[key] = [_build(StageConfig, s, f"stages.{i}") for i, s in enumerate(value)]
        elif key == "betas":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ConfigError(f"config key {path} = {value!r} must be a list of two numbers in [0, 1)")
            values[key] = tuple(_coerce(float, b, path) for b in value)
        else:
            values[key] = _coerce(hint, value, path)
    return cls(**values)


def _type_name(hint) -> str:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return " or ".join("null" if kind is type(None) else getattr(kind, "__name__", str(kind)) for kind in options)


def _coerce(hint, value, path: str):
    """Convert a YAML value to the field's type (`1e-4` is a string to YAML 1.1); refuse what does not fit."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key {path} cannot be null (expected {_type_name(hint)})")
    for kind in options:
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind in (int, float):
            if isinstance(value, bool):
                continue
            try:
                number = float(value) if kind is float else (int(value) if not isinstance(value, str)
                                                             else int(float(value)))
            except (TypeError, ValueError, OverflowError):
                continue
            if kind is int and isinstance(value, (float, str)) and float(value) != number:
                continue
            return number
        elif kind is str:
            if isinstance(value, str):
                return value
    raise ConfigError(f"config key {path} = {value!r:.60} is not a valid {_type_name(hint)}")


def _set_dotted(tree: dict, dotted: str, value) -> None:
    """Set `tree[a][b][0][c] = value` for the dotted key `a.b.0.c`, creating mappings on the way."""
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"override --{dotted}: {'.'.join(parts[:i])} is a list, index it with a number")
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"override --{dotted}: index {idx} is past the {len(node)} entries of the list")
            node = node[idx]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"override --{dotted}: {'.'.join(parts[:i])} is a value, not a section")
            node = node.setdefault(part, [] if nxt.isdigit() and part == "stages" else {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override --{dotted}: {last} is not an index of the {len(node)} stages")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override --{dotted}: {'.'.join(parts[:-1])} is a value, not a section")


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """`["--a.b=1", "--c", "x"]` -> `[("a.b", 1), ("c", "x")]`; values parsed as YAML scalars."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"override --{key}: cannot read the value {raw!r}") from None
        pairs.append((key, value))
        i += 1
    return pairs


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (`demo`, `eagle25-8b`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a YAML file nor a preset; presets: {', '.join(names)}")


def load_config(name_or_path: str, overrides: list[str] | None = None, world_size: int | None = None) -> TrainConfig:
    """Read a preset or YAML file, apply `--dotted.key=value` overrides, validate, return a TrainConfig.

    `world_size` (default: torchrun's WORLD_SIZE, else 1) is checked against every stage's context parallelism.
    """
    path = resolve_config_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    for key, value in parse_overrides(list(overrides or [])):
        _set_dotted(tree, key, value)
    config = _build(TrainConfig, tree, "")
    validate(config, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)
    return config


# ---------------------------------------------------------------- validation
def _require(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key} = {value!r} is not allowed: {allowed}")


def _one_of(key: str, value, choices) -> None:
    _require(value in choices, key, value, f"choose one of {', '.join(map(str, choices))}")


def model_heads(config: TrainConfig) -> tuple[int, int]:
    """(query heads, KV heads) of the language model, read from config.json without building anything."""
    if config.model.pretrained:
        text = json.loads((Path(config.model.pretrained) / "config.json").read_text()).get("text_config", {})
        return int(text.get("num_attention_heads", 0)), int(text.get("num_key_value_heads", 0) or
                                                            text.get("num_attention_heads", 0))
    return SIZE_HEADS[config.model.size]


def _validate_model(model: ModelConfig) -> None:
    if model.dtype == "float16" or model.dtype == "fp16":
        raise ConfigError(f"config key model.dtype = {model.dtype!r} is not supported: float16 needs loss scaling, "
                          f"which this trainer does not do; use bfloat16 (same speed, no overflow) or float32")
    _one_of("model.dtype", model.dtype, DTYPES)
    _one_of("model.reduce_dtype", model.reduce_dtype, ("float32", "bfloat16"))
    if model.pretrained is not None:
        folder = Path(model.pretrained)
        _require(folder.is_dir(), "model.pretrained", model.pretrained, "no such folder on this machine (models "
                 "are loaded from local folders only)")
        _require((folder / "config.json").is_file(), "model.pretrained", model.pretrained,
                 "the folder has no config.json: point it at an Eagle checkpoint folder")
    else:
        _one_of("model.size", model.size, tuple(SIZE_HEADS))


def _validate_stage(i: int, stage: StageConfig, previous: StageConfig | None, world: int, heads) -> None:
    key = f"stages.{i}"
    _require(stage.max_length >= 2, f"{key}.max_length", stage.max_length, "at least 2 tokens")
    if previous is not None:
        _require(stage.max_length >= previous.max_length, f"{key}.max_length", stage.max_length,
                 f"stages grow: at least the previous stage's {previous.max_length}")
    if stage.steps is None and stage.tokens is None:
        raise ConfigError(f"config {key} ({stage.name}) needs steps or tokens (a positive number)")
    if stage.steps is not None and stage.tokens is not None:
        raise ConfigError(f"config {key} ({stage.name}) has steps = {stage.steps} and tokens = {stage.tokens}: "
                          f"give exactly one of steps or tokens")
    if stage.steps is not None:
        _require(stage.steps >= 1, f"{key}.steps", stage.steps, "at least 1")
    if stage.tokens is not None:
        _require(stage.tokens >= 1, f"{key}.tokens", stage.tokens, "at least 1")
    _require(stage.cp >= 1, f"{key}.cp", stage.cp, "at least 1")
    _require(world % stage.cp == 0, f"{key}.cp", stage.cp, f"must divide the world size {world} (processes "
             f"started by torchrun)")
    _require(stage.ulysses >= 1 and stage.cp % stage.ulysses == 0, f"{key}.ulysses", stage.ulysses,
             f"must divide cp = {stage.cp}")
    _require(stage.max_length >= 2 * stage.cp, f"{key}.max_length", stage.max_length,
             f"at least 2 x cp = {2 * stage.cp} tokens")
    _one_of(f"{key}.cp_algorithm", stage.cp_algorithm, CP_ALGORITHMS)
    q_heads, kv_heads = heads
    algorithm, ring = stage.cp_algorithm, stage.cp // stage.ulysses
    fits = lambda size: q_heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)
    if algorithm == "ulysses":
        _require(fits(stage.cp), f"{key}.cp_algorithm", algorithm, f"Ulysses over cp = {stage.cp} ranks needs "
                 f"{q_heads} query heads divisible by it and {kv_heads} KV heads dividing or divisible by it")
    if algorithm.startswith("hybrid"):
        _require(stage.ulysses > 1 and ring > 1, f"{key}.cp_algorithm", algorithm,
                 f"a hybrid needs ulysses > 1 and cp / ulysses > 1 (got ulysses {stage.ulysses}, cp {stage.cp})")
        _require(fits(stage.ulysses), f"{key}.ulysses", stage.ulysses, f"Ulysses over {stage.ulysses} ranks needs "
                 f"{q_heads} query heads divisible by it and {kv_heads} KV heads dividing or divisible by it")
    if algorithm in ("ring", "allgather", "ulysses"):
        _require(stage.ulysses == 1, f"{key}.ulysses", stage.ulysses,
                 f"cp_algorithm {algorithm} uses all cp ranks one way: set ulysses to 1 or pick a hybrid")
    _require(stage.lr > 0, f"{key}.lr", stage.lr, "a positive number")
    _require(0 <= stage.warmup_fraction < 1, f"{key}.warmup_fraction", stage.warmup_fraction, "in [0, 1)")
    _require(0 <= stage.min_lr_ratio <= 1, f"{key}.min_lr_ratio", stage.min_lr_ratio, "in [0, 1]")
    _require(stage.max_frames >= 1, f"{key}.max_frames", stage.max_frames, "at least 1")
    _require(stage.max_tiles >= 1, f"{key}.max_tiles", stage.max_tiles, "at least 1")


def validate(config: TrainConfig, world_size: int = 1) -> None:
    """Reject every setting that cannot train, before any model, data or process group is built."""
    _validate_model(config.model)
    data = config.data
    _one_of("data.source", data.source, ("synthetic", "mixture"))
    if data.tokenizer is not None:
        _require(Path(data.tokenizer).is_dir(), "data.tokenizer", data.tokenizer, "no such folder on this machine")
    _require(data.num_samples >= 1, "data.num_samples", data.num_samples, "at least 1")
    _require(data.num_workers >= 0, "data.num_workers", data.num_workers, ">= 0")
    _require(data.index_workers >= 0, "data.index_workers", data.index_workers, ">= 0")
    heads = model_heads(config)
    previous = None
    for i, stage in enumerate(config.stages):
        _validate_stage(i, stage, previous, world_size, heads)
        previous = stage
    optim = config.optim
    for n, beta in enumerate(optim.betas):
        _require(0 <= beta < 1, "optim.betas", list(optim.betas), f"two numbers in [0, 1) (entry {n} is {beta})")
    _require(optim.eps > 0, "optim.eps", optim.eps, "a positive number")
    _require(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, ">= 0")
    _require(optim.max_grad_norm >= 0, "optim.max_grad_norm", optim.max_grad_norm, ">= 0 (0 turns clipping off)")
    memory = config.memory
    _one_of("memory.activation_checkpointing", memory.activation_checkpointing, ("none", "full", "selective"))
    _require(memory.ac_every >= 1, "memory.ac_every", memory.ac_every, "at least 1")
    _require(memory.tiled_mlp_tokens >= 0, "memory.tiled_mlp_tokens", memory.tiled_mlp_tokens, ">= 0 (0: off)")
    _require(memory.vision_micro_batch >= 0, "memory.vision_micro_batch", memory.vision_micro_batch, ">= 0 (0: off)")
    kernels = config.kernels
    _one_of("kernels.loss_chunking", kernels.loss_chunking, ("tokens", "vocab"))
    _one_of("kernels.lm_head_grad_dtype", kernels.lm_head_grad_dtype, ("float32", "weight"))
    if kernels.loss_chunking == "vocab":
        _require(kernels.lm_head_grad_dtype == "float32", "kernels.lm_head_grad_dtype", kernels.lm_head_grad_dtype,
                 "vocab chunking forms each gradient slice in one float32 GEMM: use float32, or loss_chunking=tokens")
    checkpoint = config.checkpoint
    _require(checkpoint.interval >= 0, "checkpoint.interval", checkpoint.interval, ">= 0 (0: stage ends only)")
    _require(checkpoint.keep >= 1, "checkpoint.keep", checkpoint.keep, "at least 1 (the one resume needs)")
    metrics = config.metrics
    _require(metrics.log_every >= 1, "metrics.log_every", metrics.log_every, "at least 1")
    if metrics.peak_tflops is not None:
        _require(metrics.peak_tflops > 0, "metrics.peak_tflops", metrics.peak_tflops, "a positive number or null")
    _require(config.faults.max_consecutive_nonfinite >= 1, "faults.max_consecutive_nonfinite",
             config.faults.max_consecutive_nonfinite, "at least 1")


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def describe_plan(config: TrainConfig, world_size: int) -> str:
    """One line per stage: what a run of this configuration on `world_size` processes would train."""
    lines = [f"config valid for {world_size} process(es): model {config.model.pretrained or config.model.size}, "
             f"dtype {config.model.dtype}, data {config.data.source} from {config.data.dir}"]
    for i, stage in enumerate(config.stages):
        dp = world_size // stage.cp
        steps = stage.steps if stage.steps is not None else -(-stage.tokens // (stage.max_length * dp))
        lines.append(f"stages.{i} {stage.name}: max_length {stage.max_length}, cp {stage.cp} (ulysses "
                     f"{stage.ulysses}, {stage.cp_algorithm}), dp {dp}, {steps} steps, lr {stage.lr}")
    return "\n".join(lines)


def describe_keys() -> str:
    """Every config key with its type, default and meaning: the trainer's --help."""
    lines = []

    def walk(cls, prefix):
        for field in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[field.name]
            key = f"{prefix}{field.name}"
            if dataclasses.is_dataclass(hint):
                lines.append(f"{key}: {(hint.__doc__ or '').strip().splitlines()[0]}")
                walk(hint, key + ".")
            elif field.name == "stages":
                lines.append("stages.N: the stages, in order (N = 0, 1, ...)")
                walk(StageConfig, "stages.N.")
            else:
                default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
                shown = "null" if default is None else (list(default) if isinstance(default, tuple) else default)
                lines.append(f"  --{key}  ({_type_name(hint)}, default {shown}): {field.metadata.get('help', '')}")

    walk(TrainConfig, "")
    return "\n".join(lines)
