"""Every configuration mistake is one line naming the key, the bad value and what is allowed, found before any
model, data or process group is built; --help lists every key with its type, default and meaning."""
import dataclasses
import subprocess
import sys
import typing

import pytest

from longvl.eagle.train.config import ConfigError, StageConfig, TrainConfig, load_config

# (overrides, world size, words the message must hold: the key first)
CASES = {
    "fp16 alias": (["--model.dtype=fp16"], 1, ["model.dtype", "fp16", "loss scaling", "bfloat16"]),
    "float16": (["--model.dtype=float16"], 1, ["model.dtype", "float16", "loss scaling", "bfloat16"]),
    "unknown dtype": (["--model.dtype=int8"], 1, ["model.dtype", "int8", "auto, bfloat16, float32"]),
    "reduce dtype": (["--model.reduce_dtype=half"], 1, ["model.reduce_dtype", "half", "float32"]),
    "log_every 0": (["--metrics.log_every=0"], 1, ["metrics.log_every", "0", "at least 1"]),
    "log_every negative": (["--metrics.log_every=-3"], 1, ["metrics.log_every", "-3", "at least 1"]),
    "one beta": (["--optim.betas=[0.9]"], 1, ["optim.betas", "0.9", "two numbers in [0, 1)"]),
    "beta of 1": (["--optim.betas=[0.9, 1.0]"], 1, ["optim.betas", "1.0", "[0, 1)"]),
    "negative beta": (["--optim.betas=[-0.1, 0.9]"], 1, ["optim.betas", "-0.1", "[0, 1)"]),
    "negative clip norm": (["--optim.max_grad_norm=-1"], 1, ["optim.max_grad_norm", "-1", ">= 0"]),
    "zero eps": (["--optim.eps=0"], 1, ["optim.eps", "0", "positive"]),
    "negative steps": (["--stages.0.steps=-4"], 1, ["stages.0.steps", "-4", "at least 1"]),
    "zero steps": (["--stages.0.steps=0"], 1, ["stages.0.steps", "0", "at least 1"]),
    "negative tokens": (["--stages.0.steps=null", "--stages.0.tokens=-5"], 1, ["stages.0.tokens", "-5"]),
    "steps and tokens": (["--stages.0.tokens=1000"], 1, ["stages.0", "exactly one of steps or tokens"]),
    "neither steps nor tokens": (["--stages.0.steps=null"], 1, ["stages.0", "steps or tokens"]),
    "negative interval": (["--checkpoint.interval=-2"], 1, ["checkpoint.interval", "-2", ">= 0"]),
    "keep 0": (["--checkpoint.keep=0"], 1, ["checkpoint.keep", "0", "at least 1"]),
    "decreasing max_length": (["--stages.1.max_length=256"], 1, ["stages.1.max_length", "256", "512"]),
    "ulysses not dividing cp": (["--stages.2.cp=2", "--stages.2.ulysses=3"], 2, ["stages.2.ulysses", "3", "cp = 2"]),
    "cp not dividing the world": (["--stages.2.cp=4"], 2, ["stages.2.cp", "4", "world size 2"]),
    "cp on one process": (["--stages.2.cp=2"], 1, ["stages.2.cp", "2", "world size 1"]),
    "ulysses impossible for the heads": (["--stages.2.cp=8", "--stages.2.cp_algorithm=ulysses",
                                          "--stages.2.max_length=4096"], 8,
                                         ["stages.2.cp_algorithm", "ulysses", "4 query heads"]),
    "hybrid without ulysses": (["--stages.2.cp=2", "--stages.2.cp_algorithm=hybrid_ring"], 2,
                               ["stages.2.cp_algorithm", "hybrid_ring", "ulysses > 1"]),
    "unknown algorithm": (["--stages.0.cp_algorithm=tree"], 1, ["stages.0.cp_algorithm", "tree", "ring"]),
    "unknown key, did you mean": (["--optim.weight_decy=0.1"], 1, ["optim.weight_decy", "did you mean optim.weight_decay"]),
    "unknown section": (["--modle.dtype=auto"], 1, ["modle", "did you mean model"]),
    "learning rate is per stage": (["--optim.lr=1e-5"], 1, ["optim.lr", "--stages.N.lr"]),
    "wrong type int": (["--stages.0.steps=many"], 1, ["stages.0.steps", "many", "int"]),
    "wrong type bool": (["--kernels.enabled=maybe"], 1, ["kernels.enabled", "maybe", "bool"]),
    "wrong type float": (["--stages.0.lr=fast"], 1, ["stages.0.lr", "fast", "float"]),
    "missing pretrained folder": (["--model.pretrained=/nonexistent/Eagle2.5-8B"], 1,
                                  ["model.pretrained", "/nonexistent/Eagle2.5-8B", "no such folder"]),
    "unknown size": (["--model.size=70b"], 1, ["model.size", "70b", "tiny"]),
    "warmup of 1.5": (["--stages.0.warmup_fraction=1.5"], 1, ["stages.0.warmup_fraction", "1.5", "[0, 1)"]),
    "unknown data source": (["--data.source=web"], 1, ["data.source", "web", "synthetic"]),
    "vocab chunking with bf16 grad": (["--kernels.loss_chunking=vocab", "--kernels.lm_head_grad_dtype=weight"], 1,
                                      ["kernels.lm_head_grad_dtype", "weight", "float32"]),
    "bad override syntax": (["stages.0.steps=1"], 1, ["stages.0.steps=1", "--section.key=value"]),
    "index past the stages": (["--stages.7.steps=1"], 1, ["stages.7.steps", "index 7"]),
    "checkpointing mode": (["--memory.activation_checkpointing=some"], 1,
                           ["memory.activation_checkpointing", "some", "none, full, selective"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_config_mistake_is_one_line_naming_the_key(name):
    overrides, world, words = CASES[name]
    with pytest.raises(ConfigError) as caught:
        load_config("demo", overrides, world_size=world)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_unknown_preset_names_the_presets():
    with pytest.raises(ConfigError, match="presets: demo, eagle25-8b"):
        load_config("no-such-preset")


def test_good_configs_pass():
    load_config("demo")
    load_config("demo", ["--stages.2.cp=2", "--stages.2.cp_algorithm=ring"], world_size=2)
    load_config("eagle25-8b", world_size=8)


def test_cli_prints_the_error_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "longvl.eagle.train", "--config", "demo", "--model.dtype=fp16"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.dtype" in lines[0] and "bfloat16" in lines[0], result.stderr


def _all_keys():
    keys = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[field.name]):
                walk(hints[field.name], f"{prefix}{field.name}.")
            elif field.name == "stages":
                walk(StageConfig, "stages.N.")
            else:
                keys.append(f"{prefix}{field.name}")

    walk(TrainConfig, "")
    return keys


def test_help_lists_every_key_with_type_default_and_meaning():
    result = subprocess.run([sys.executable, "-m", "longvl.eagle.train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for key in _all_keys():
        line = next((line for line in lines if line.strip().startswith(f"--{key}  ")), None)
        assert line is not None, key
        assert "default" in line and line.rstrip().split("): ", 1)[1].strip(), line
