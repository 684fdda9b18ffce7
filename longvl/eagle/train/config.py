"""The trainer's configuration: dataclasses filled from one YAML file plus dotted command-line overrides.

`load_config("demo", ["--stages.0.steps=5", "--optim.lr=1e-4"])` reads `longvl/eagle/configs/demo.yaml` (or any
path), applies the overrides in order and validates the result. Values of overrides are parsed as YAML
scalars, so `--kernels.enabled=false` is a bool and `--optim.lr=1e-4` a float. Unknown keys raise with the
valid names: a typo must never silently train with a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass
class ModelConfig:
    """Which Eagle model to build: a named size with random weights, or a checkpoint directory."""
    size: str = "tiny"                 # "tiny" (demo, tests) or "eagle25-8b" (SPEC section 2 shapes)
    pretrained: str | None = None      # a HF-layout Eagle checkpoint directory (overrides `size`)
    dtype: str = "bfloat16"            # parameter dtype for compute (FSDP param_dtype)
    reduce_dtype: str = "float32"      # gradient reduction dtype (FSDP reduce_dtype)


@dataclasses.dataclass
class DataConfig:
    """Where packed training samples come from (longvl/eagle/data: mixture -> offline index -> packs)."""
    source: str = "synthetic"          # "synthetic": generated into `dir` on first use; "mixture": `dir`/mixture.yaml
    dir: str = "outputs/demo/data"
    tokenizer: str | None = None       # a tokenizer folder; None: the built-in tiny tokenizer (demo, tests)
    backend: str = "longvl.eagle.data.eagle_backend:EagleBackend"   # processor factory (longvl/eagle/data/backend.py)
    num_samples: int = 64              # synthetic records to generate
    num_workers: int = 0               # DataLoader workers (spawned); 0 loads in the training process
    index_workers: int = 0             # processes planning the offline index (0: in rank 0's process)
    seed: int = 0


@dataclasses.dataclass
class StageConfig:
    """One stage of progressive training: its own max length, CP degree, budget and learning rate."""
    name: str = "stage"
    max_length: int = 32768            # tokens per packed sequence (before context-parallel sharding)
    cp: int = 1                        # context-parallel degree; data parallel = world / cp
    ulysses: int = 1                   # Ulysses share of `cp` (cp = ulysses x ring)
    cp_algorithm: str = "auto"         # parallel/ algorithm: ring, allgather, ulysses, hybrid_ring, hybrid_allgather
    steps: int | None = None           # optimizer steps in this stage ...
    tokens: int | None = None          # ... or a token budget (steps = ceil(tokens / (max_length x dp)))
    lr: float = 2e-5
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.0          # cosine floor as a fraction of `lr`
    max_frames: int = 128              # video frame cap for this stage
    max_tiles: int = 12                # image tile cap for this stage


@dataclasses.dataclass
class OptimConfig:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0


@dataclasses.dataclass
class MemoryConfig:
    activation_checkpointing: str = "full"   # "none", "full" (every layer) or "selective" (every `ac_every`-th)
    ac_every: int = 2
    offload_activations: bool = False        # CPU offload of checkpointed hidden states on a side stream
    offload_params: bool = False             # FSDP2 CPUOffloadPolicy: params, grads and the optimizer step on CPU


@dataclasses.dataclass
class KernelsConfig:
    """Our Triton kernels, installed through longvl.kernels.hf_patch.apply_kernels."""
    enabled: bool = True
    on_cpu: bool = True                # on CPU they run through Triton's interpreter (slow but exact)
    rms_norm: bool = True
    rope: bool = True
    swiglu: bool = True
    linear_cross_entropy: bool = True


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = "outputs/demo/checkpoints"
    interval: int = 0                  # save every N steps (0: only at stage boundaries and the end)
    async_save: bool = True            # asynchronous DCP save where the backend allows it
    keep: int = 2                      # complete checkpoints kept on disk
    resume: bool = True                # continue from the newest complete checkpoint in `dir`
    export_hf: bool = False            # write HF safetensors in the released layout at the end


@dataclasses.dataclass
class MetricsConfig:
    dir: str = "outputs/demo/metrics"
    log_every: int = 1
    tensorboard: bool = True           # used when the tensorboard package is installed
    progress_bar: bool = True
    plot: bool = True                  # PNG of loss and throughput at the end
    peak_tflops: float | None = None   # per-device dense bf16 peak for MFU; None: looked up from the device name


@dataclasses.dataclass
class FaultsConfig:
    max_consecutive_nonfinite: int = 5


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    stages: list[StageConfig] = dataclasses.field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    kernels: KernelsConfig = dataclasses.field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    faults: FaultsConfig = dataclasses.field(default_factory=FaultsConfig)


def _build(cls, data, where: str):
    """Build dataclass `cls` from a YAML mapping, recursing into nested dataclasses and stage lists."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or 'root'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'root'}; valid: {sorted(names)}")
    values = {}
    for key, value in data.items():
        hint, path = hints[key], f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, path)
        elif key == "stages":
            if not isinstance(value, list) or not value:
                raise ValueError("config key stages must be a non-empty list of stages")
            values[key] = [_build(StageConfig, s, f"stages.{i}") for i, s in enumerate(value)]
        elif key == "betas":
            values[key] = tuple(_coerce(float, b, path) for b in value)
        else:
            values[key] = _coerce(hint, value, path)
    return cls(**values)


def _coerce(hint, value, path: str):
    """Convert a YAML value to the field's type (`1e-4` is a string to YAML 1.1); refuse what does not fit."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"config key {path} cannot be null")
    for kind in options:
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind in (int, float):
            if isinstance(value, bool):
                continue
            try:
                number = kind(value) if not isinstance(value, str) or kind is float else int(float(value))
            except (TypeError, ValueError):
                continue
            if kind is int and isinstance(value, float) and not value.is_integer():
                continue
            return number
        elif kind is str:
            if isinstance(value, str):
                return value
    raise ValueError(f"config key {path} = {value!r} is not a valid {hint}")


def _set_dotted(tree: dict, dotted: str, value) -> None:
    """Set `tree[a][b][0][c] = value` for the dotted key `a.b.0.c`, creating mappings on the way."""
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ValueError(f"override {dotted}: index {idx} is past the {len(node)} entries of the list")
            node = node[idx]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() and part == "stages" else {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """`["--a.b=1", "--c", "x"]` -> `[("a.b", 1), ("c", "x")]`; values parsed as YAML scalars."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"override {arg!r} must look like --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 1
        pairs.append((key, yaml.safe_load(raw) if raw != "" else None))
        i += 1
    return pairs


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (`demo`, `eagle25-8b`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a YAML file nor a preset; presets: {names}")


def load_config(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Read a preset or YAML file, apply `--dotted.key=value` overrides, validate, return a TrainConfig."""
    tree = yaml.safe_load(resolve_config_path(name_or_path).read_text()) or {}
    for key, value in parse_overrides(list(overrides or [])):
        _set_dotted(tree, key, value)
    config = _build(TrainConfig, tree, "")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Reject settings that cannot train, naming the stage and the field."""
    if config.memory.activation_checkpointing not in ("none", "full", "selective"):
        raise ValueError(f"memory.activation_checkpointing must be none, full or selective, "
                         f"got {config.memory.activation_checkpointing!r}")
    if config.memory.ac_every < 1:
        raise ValueError(f"memory.ac_every must be >= 1, got {config.memory.ac_every}")
    for i, stage in enumerate(config.stages):
        if (stage.steps is None) == (stage.tokens is None):
            raise ValueError(f"stages.{i} ({stage.name}) needs exactly one of steps or tokens")
        if stage.cp < 1 or stage.ulysses < 1 or stage.cp % stage.ulysses:
            raise ValueError(f"stages.{i} ({stage.name}): cp={stage.cp} must be a positive multiple of "
                             f"ulysses={stage.ulysses}")
        if stage.max_length < 2 * stage.cp:
            raise ValueError(f"stages.{i} ({stage.name}): max_length={stage.max_length} is too short for cp={stage.cp}")
        if stage.lr <= 0 or not 0 <= stage.warmup_fraction < 1:
            raise ValueError(f"stages.{i} ({stage.name}): lr must be > 0 and warmup_fraction in [0, 1)")
    if config.faults.max_consecutive_nonfinite < 1:
        raise ValueError("faults.max_consecutive_nonfinite must be >= 1")


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
