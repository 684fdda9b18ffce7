"""The trainer end to end on CPU with gloo: data parallel then context parallel stages, CP = 2 against CP = 1,
kill -9 and resume (bitwise), a 2-node launch on localhost, and the non-finite step guard.

All runs use the demo's tiny Eagle on the generated image + video + text data, kernels off (CPU interpreter).
"""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from longvl.eagle.train.config import CONFIG_DIR
from longvl.eagle.train.metrics import read_jsonl
from tests.distributed import cpu_only_env, free_port, run_distributed

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from longvl.eagle.data.synthetic import generate

    folder = tmp_path_factory.mktemp("train_data")
    generate(str(folder), num=48, seed=0)
    return folder


def write_config(folder: Path, data_dir: Path, stages: list, **sections) -> Path:
    """The demo config with these stages and dirs under `folder`; `sections` update top-level sections."""
    tree = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    tree["stages"] = stages
    tree["data"]["dir"] = str(data_dir)
    tree["checkpoint"].update(dir=str(folder / "ckpt"), export_hf=False)
    tree["metrics"].update(dir=str(folder / "metrics"), progress_bar=False, plot=False, tensorboard=False)
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _train(rank, world, config_path):
    from longvl import kernels  # noqa: F401
    from longvl.eagle.train.config import load_config
    from longvl.eagle.train.trainer import train

    train(load_config(config_path))


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(folder / "metrics" / "metrics.jsonl")]


def test_dp2_then_cp2_stages_learn(tmp_path, data_dir):
    stages = [{"name": "dp2", "max_length": 512, "cp": 1, "steps": 8, "lr": 3e-3, "warmup_fraction": 0.1},
              {"name": "cp2", "max_length": 1024, "cp": 2, "steps": 6, "lr": 2e-3, "warmup_fraction": 0.0}]
    config = write_config(tmp_path, data_dir, stages, checkpoint={"export_hf": True, "interval": 0},
                          metrics={"plot": True})
    run_distributed(_train, 2, str(config), timeout=400)
    records = read_jsonl(tmp_path / "metrics" / "metrics.jsonl")
    assert [r["stage"] for r in records] == ["dp2"] * 8 + ["cp2"] * 6
    values = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in values)
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.3, values
    assert all(r["tokens_per_s_per_gpu"] > 0 and 0 <= r["data_share"] <= 1 for r in records)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "step-00000008" in names and "step-00000014" in names       # stage boundary and the end
    assert (tmp_path / "ckpt" / "hf" / "model.safetensors.index.json").exists()
    assert (tmp_path / "metrics" / "metrics.png").stat().st_size > 0


def test_cp2_matches_cp1_on_image_and_video_packs(tmp_path, data_dir):
    stage = {"name": "s", "max_length": 1024, "steps": 20, "lr": 2e-3, "warmup_fraction": 0.1}
    cp1 = write_config(tmp_path / "cp1", data_dir, [dict(stage, cp=1)])
    cp2 = write_config(tmp_path / "cp2", data_dir, [dict(stage, cp=2)])
    run_distributed(_train, 1, str(cp1), timeout=300)
    run_distributed(_train, 2, str(cp2), timeout=300)
    one, two = read_jsonl(tmp_path / "cp1" / "metrics" / "metrics.jsonl"), read_jsonl(
        tmp_path / "cp2" / "metrics" / "metrics.jsonl")
    assert len(one) == len(two) == 20
    assert any(r["images"] for r in one) and any(r["frames"] for r in one)     # image and video packs
    assert [r["docs"] for r in one] == [r["docs"] for r in two]                 # the same packs
    # fp32 throughout; the CP=2 run merges attention blocks and reduces in another order, nothing else
    # (measured here: 2e-7 relative on the loss, 1.2e-6 on the grad norm, after 20 steps).
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]), (a["step"], a["grad_norm"],
                                                                                   b["grad_norm"])


def _torchrun(config: Path, nproc: int, *, nnodes: int = 1, node_rank: int = 0, port: int | None = None):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        command += ["--standalone"]
    else:
        command += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--master-addr=127.0.0.1",
                    f"--master-port={port}"]
    command += ["-m", "longvl.eagle.train", "--config", str(config)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **cpu_only_env(nproc * nnodes))
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (torchrun's workers leave its process group)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = list(children.get(pid, [])), []
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants."""
    for member in [pid] + descendants(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_after_step(proc, metrics, step: int, timeout: float) -> int:
    """SIGKILL the run (and its workers) once its metrics hold `step` rows; return the rows written by then."""
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(read_jsonl(metrics)) >= step):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.05)
    _kill_tree(proc.pid)
    proc.wait()
    return len(read_jsonl(metrics))


def _finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        raise
    assert proc.returncode == 0, out[-4000:]
    return out


def test_two_node_launch_then_kill9_resume_is_bitwise_identical(tmp_path, data_dir):
    stage = [{"name": "s", "max_length": 512, "cp": 1, "steps": 16, "lr": 2e-3, "warmup_fraction": 0.1}]
    sections = {"checkpoint": {"interval": 3, "async_save": True}}
    # Reference: an uninterrupted run launched as 2 nodes of 1 process each on localhost.
    reference = write_config(tmp_path / "two_nodes", data_dir, stage, **sections)
    port = free_port()
    nodes = [_torchrun(reference, 1, nnodes=2, node_rank=r, port=port) for r in (0, 1)]
    for proc in nodes:
        _finish(proc)
    # The same run on one node of 2 processes, killed with SIGKILL after step 5, then resumed.
    resumed = write_config(tmp_path / "killed", data_dir, stage, **sections)
    proc = _torchrun(resumed, 2)
    metrics = tmp_path / "killed" / "metrics" / "metrics.jsonl"
    killed_at = _kill_after_step(proc, metrics, 5, timeout=300)
    assert killed_at < 16, "the run ended before it could be killed"
    out = _finish(_torchrun(resumed, 2))
    assert "resumed from" in out
    resumed_step = int(out.split("resumed from")[1].split("step-")[1][:8])
    assert 3 <= resumed_step <= killed_at and resumed_step % 3 == 0
    want, got = read_jsonl(tmp_path / "two_nodes" / "metrics" / "metrics.jsonl"), read_jsonl(metrics)
    assert [r["step"] for r in got] == list(range(1, 17))
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in want]


def _train_with_nan(rank, world, config_path, nan_calls, expect_stop):
    from longvl import kernels  # noqa: F401
    import torch

    from longvl.eagle.modeling_eagle import EagleForConditionalGeneration
    from longvl.eagle.train.config import load_config
    from longvl.eagle.train.faults import NonFiniteStop
    from longvl.eagle.train.trainer import train

    original, calls = EagleForConditionalGeneration.packed_loss, {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * torch.nan if calls["n"] in nan_calls else loss

    EagleForConditionalGeneration.packed_loss = sometimes_nan
    try:
        train(load_config(config_path))
    except NonFiniteStop as stop:
        assert expect_stop, stop
        return str(stop)
    assert not expect_stop
    return None


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, data_dir):
    stage = [{"name": "s", "max_length": 512, "cp": 1, "steps": 6, "lr": 2e-3, "warmup_fraction": 0.0}]
    config = write_config(tmp_path / "skip", data_dir, stage, faults={"max_consecutive_nonfinite": 3})
    assert run_distributed(_train_with_nan, 1, str(config), {2, 3}, False, timeout=200) == [None]
    records = read_jsonl(tmp_path / "skip" / "metrics" / "metrics.jsonl")
    assert [r["applied"] for r in records] == [True, False, False, True, True, True]
    assert records[-1]["skipped_steps"] == 2
    config = write_config(tmp_path / "stop", data_dir, stage, faults={"max_consecutive_nonfinite": 2})
    message = run_distributed(_train_with_nan, 1, str(config), {2, 3}, True, timeout=200)[0]
    assert "2 consecutive steps with a non-finite loss" in message and "stage 's'" in message


def _train_and_keep_weights(rank, world, config_path):
    from longvl import kernels  # noqa: F401
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from longvl.eagle.train.config import load_config
    from longvl.eagle.train.trainer import Trainer

    trainer = Trainer(load_config(config_path))
    trainer.run()
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # numpy, not tensors: tensors cross process boundaries as shared-memory handles that die with this process
    return {key: value.float().numpy().copy() for key, value in state.items()}, trainer.model.config.to_dict()


def test_training_export_loads_with_auto_classes_and_gives_the_same_logits(tmp_path, data_dir):
    """demo-sized training -> the trainer's HF export -> AutoModel / AutoProcessor on their own -> the logits of
    the trained model in memory (weights rounded to the export's bf16 on both sides)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    import longvl.eagle  # noqa: F401  (registers the Auto classes)
    from longvl.eagle.configuration_eagle import EagleConfig
    from longvl.eagle.modeling_eagle import EagleForConditionalGeneration

    stage = [{"name": "s", "max_length": 512, "cp": 1, "steps": 3, "lr": 2e-3, "warmup_fraction": 0.0}]
    config = write_config(tmp_path / "run", data_dir, stage)
    tree = yaml.safe_load(config.read_text())
    tree["checkpoint"]["export_hf"] = True
    config.write_text(yaml.safe_dump(tree))
    weights, model_config = run_distributed(_train_and_keep_weights, 1, str(config), timeout=300)[0]
    folder = tmp_path / "run" / "ckpt" / "hf"
    loaded = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    in_memory = EagleForConditionalGeneration(EagleConfig.from_dict(model_config)).eval()
    in_memory.load_state_dict({k: torch.from_numpy(v).to(torch.bfloat16).float() for k, v in weights.items()})
    inputs = processor(text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True), images=[_picture()], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, in_memory(**inputs).logits)


def _picture():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))


def test_tiled_mlp_and_vision_micro_batches_train_like_the_plain_model(tmp_path, data_dir):
    """The single-GPU long-context settings change memory, not the math: the same losses up to fp32 summation
    order (the tiled MLP sums parameter gradients over chunks; 1e-5 relative over 4 steps)."""
    stage = [{"name": "s", "max_length": 1024, "cp": 1, "steps": 4, "lr": 2e-3, "warmup_fraction": 0.0}]
    plain = write_config(tmp_path / "plain", data_dir, stage)
    tiled = write_config(tmp_path / "tiled", data_dir, stage,
                         memory={"tiled_mlp_tokens": 64, "vision_micro_batch": 2, "offload_activations": True})
    run_distributed(_train, 1, str(plain), timeout=300)
    run_distributed(_train, 1, str(tiled), timeout=300)
    want, got = losses(tmp_path / "plain"), losses(tmp_path / "tiled")
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)
