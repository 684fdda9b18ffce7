"""Trainer components on CPU: config and overrides, the LR schedule, MFU accounting, non-finite guard,
activation checkpointing with CPU offload, atomic checkpoints (a save killed with SIGKILL is never loaded)
and the HF safetensors export."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from longvl.eagle.train import metrics as metrics_mod
from longvl.eagle.train.config import StageConfig, load_config, parse_overrides
from longvl.eagle.train.faults import NonFiniteGuard, NonFiniteStop
from longvl.eagle.train.offload import CPUOffloadHooks, apply_activation_checkpointing
from longvl.eagle.train.stage import learning_rate, stage_steps
from tests.distributed import run_distributed


# --- config ---------------------------------------------------------------------------------------------------
def test_config_presets_and_overrides():
    demo = load_config("demo", ["--stages.0.steps=5", "--stages.1.lr=1e-4", "--kernels.enabled=false",
                                "--optim.betas=[0.8, 0.9]", "--memory.activation_checkpointing", "selective"])
    assert demo.stages[0].steps == 5 and demo.stages[1].lr == 1e-4
    assert demo.kernels.enabled is False and demo.optim.betas == (0.8, 0.9)
    assert demo.memory.activation_checkpointing == "selective"
    big = load_config("eagle25-8b", world_size=8)
    assert [s.max_length for s in big.stages] == [32768, 65536, 131072]
    assert big.optim.weight_decay == 0.05 and big.stages[0].lr == 2e-5
    assert parse_overrides(["--a.b=1.5", "--c=x", "--d", "true"]) == [("a.b", 1.5), ("c", "x"), ("d", True)]


def test_schedule_warmup_cosine_and_token_budget():
    stage = StageConfig(steps=100, lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = [learning_rate(stage, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))        # monotone decay after warmup
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert stage_steps(StageConfig(tokens=10_000, max_length=1000), dp=4) == 3


# --- metrics --------------------------------------------------------------------------------------------------
def test_flops_model_counts_causal_attention_once_and_vision():
    fm = metrics_mod.FlopsModel(llm_params=1000, llm_layers=2, llm_hidden=8, vision_params=50, vision_layers=3,
                                vision_hidden=4, patches_per_tile=16, connector_params=7)
    flops = fm.step_flops([10, 20], num_tiles=2, visual_tokens=8)
    expected = (6 * 1000 * 30 + 6 * 2 * 8 * (100 + 400)          # dense + causal attention (half of 12 n^2 d)
                + 2 * (6 * 50 * 16 + 12 * 3 * 4 * 256) + 6 * 7 * 8)
    assert flops == expected


def test_metrics_logger_jsonl_resume_and_plot(tmp_path):
    log = metrics_mod.MetricsLogger(tmp_path, total_steps=4, tensorboard=True, progress_bar=False)
    for step in range(1, 5):
        log.log({"step": step, "stage": "a" if step < 3 else "b", "loss": 5.0 - step, "tokens_per_s_per_gpu": 10.0})
    assert log.close().exists()
    resumed = metrics_mod.MetricsLogger(tmp_path, total_steps=4, progress_bar=False, plot=False,
                                        resume_from_step=2)
    resumed.log({"step": 3, "stage": "b", "loss": 1.5, "tokens_per_s_per_gpu": 10.0})
    resumed.close()
    rows = metrics_mod.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 1.5


# --- faults ---------------------------------------------------------------------------------------------------
def test_nonfinite_guard_skips_then_stops():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.record(True, step=1, stage="s", what="loss")
    assert not guard.record(False, step=2, stage="s", what="loss")
    assert guard.record(True, step=3, stage="s", what="loss") and guard.consecutive == 0
    guard.record(False, step=4, stage="s", what="loss")
    guard.record(False, step=5, stage="s", what="loss")
    with pytest.raises(NonFiniteStop, match="3 consecutive steps with a non-finite loss"):
        guard.record(False, step=6, stage="s", what="loss")
    assert guard.total == 4


# --- activation checkpointing + offload -----------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x, scale):
        return x + self.fc2(torch.tanh(self.fc1(x))) * scale


def _run_blocks(mode, offload):
    torch.manual_seed(0)
    blocks = nn.ModuleList(_Block(24) for _ in range(4)).double()
    hooks = CPUOffloadHooks(min_bytes=0, device_copy=True) if offload else None
    assert apply_activation_checkpointing(blocks, mode, every=2, offload=hooks) == {"none": 0, "full": 4,
                                                                                    "selective": 2}[mode]
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(24, dtype=torch.float64, requires_grad=True)
    h = x
    for block in blocks:
        h = block(h, scale)
    (h.sin().sum()).backward()
    return [x.grad, scale.grad] + [p.grad for p in blocks.parameters()], hooks


@pytest.mark.parametrize("mode, offload", [("full", False), ("selective", False), ("full", True),
                                           ("selective", True)])
def test_activation_checkpointing_and_offload_keep_gradients(mode, offload):
    reference, _ = _run_blocks("none", False)
    grads, hooks = _run_blocks(mode, offload)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if offload and not torch.cuda.is_available():
        # Layer inputs went through the offload path, the shared `scale` only once (counted on a CPU-only machine:
        # with CUDA present, checkpointing saves one more tensor on this CPU-tensor path).
        assert len(hooks.handles) == {"full": 5, "selective": 3}[mode]
        assert hooks.offloaded_bytes > 0


# --- checkpoints ----------------------------------------------------------------------------------------------
_KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, torch, torch.distributed as dist
    import torch.distributed.checkpoint.filesystem as fs
    from torch.distributed.fsdp import fully_shard
    from longvl.eagle.train.checkpoint import Checkpointer
    from longvl.eagle.train.parallel_dims import init_distributed
    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward(); optim.step()
    ckpt = Checkpointer(sys.argv[1], async_save=False)
    ckpt.save(1, model, optim, {"step": 1}, {"rank": 0})
    torch.save({k: v.full_tensor() for k, v in model.state_dict().items()}, sys.argv[1] + "/weights-1.pt")
    with torch.no_grad():
        for p in model.parameters(): p.add_(1.0)
    original = fs.FileSystemWriter.write_data
    def write_then_die(self, plan, planner):
        original(self, plan, planner).wait()       # shards are on disk, metadata and marker are not
        os.kill(os.getpid(), signal.SIGKILL)
    fs.FileSystemWriter.write_data = write_then_die
    ckpt.save(2, model, optim, {"step": 2}, {"rank": 0})
""")


def _load_latest(rank, world, root):
    from torch.distributed.fsdp import fully_shard
    from longvl.eagle.train.checkpoint import Checkpointer

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(root, async_save=True)
    latest = ckpt.latest()
    trainer_state, rank_state = ckpt.load(latest, model, optim)
    # numpy, not tensors: tensors would travel through shared memory that dies with this process
    return latest.name, trainer_state, rank_state, {k: v.full_tensor().numpy() for k, v in model.state_dict().items()}


def test_checkpoint_killed_mid_save_is_never_loaded(tmp_path, monkeypatch):
    # CPU ranks on any machine: with a GPU visible, fully_shard would place the model on it (and the batch is on CPU)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    root = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(root)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (root / "step-00000002.tmp").is_dir() and not (root / "step-00000002").exists()
    assert any((root / "step-00000002.tmp").glob("*.distcp"))   # the kill really happened mid-save
    name, trainer_state, rank_state, weights = run_distributed(_load_latest, 1, str(root), timeout=120)[0]
    assert name == "step-00000001" and trainer_state == {"step": 1} and rank_state == {"rank": 0}
    for key, value in torch.load(root / "weights-1.pt").items():
        torch.testing.assert_close(torch.from_numpy(weights[key]), value, rtol=0, atol=0)
    assert not (root / "step-00000002.tmp").exists()              # stale temporary removed at start-up


def test_checkpoint_without_marker_refused(tmp_path):
    from longvl.eagle.train.checkpoint import MARKER, Checkpointer, complete_checkpoints

    (tmp_path / "step-00000005").mkdir()
    (tmp_path / "step-00000005" / ".metadata").write_text("looks like DCP")
    (tmp_path / "step-00000003").mkdir()
    (tmp_path / "step-00000003" / MARKER).write_text("ok\n")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003"]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        Checkpointer.load(object.__new__(Checkpointer), tmp_path / "step-00000005", None, None)


def _export_tiny_eagle(rank, world, out_dir):
    from torch.distributed.fsdp import fully_shard
    from longvl.eagle.configuration_eagle import tiny_eagle_config
    from longvl.eagle.modeling_eagle import EagleForConditionalGeneration
    from longvl.eagle.train.checkpoint import export_hf

    torch.manual_seed(0)
    model = EagleForConditionalGeneration(tiny_eagle_config(vocab_size=96, image_token_index=95))
    reference = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    for layer in model.language_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    export_hf(model, out_dir, config=model.config, max_shard_bytes=40_000, dtype=torch.float32)
    return reference if rank == 0 else None


def test_export_hf_released_layout(tmp_path):
    from safetensors.torch import load_file

    from longvl.eagle.modeling_eagle import EagleForConditionalGeneration

    reference = run_distributed(_export_tiny_eagle, 2, str(tmp_path), timeout=150)[0]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1                                          # sharded, with an index
    exported = {}
    for name in files:
        exported.update(load_file(tmp_path / name))
    assert set(exported) == set(reference)
    assert "language_model.lm_head.weight" in exported and "mlp1.0.weight" in exported
    assert any(k.startswith("vision_model.vision_model.encoder.layers.0.") for k in exported)
    for key, value in reference.items():
        torch.testing.assert_close(exported[key], torch.from_numpy(value), rtol=0, atol=0)
    reloaded = EagleForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, torch.from_numpy(reference[key]), rtol=0, atol=0)


# --- the training forward with our kernels --------------------------------------------------------------------
def _tiny_forward_loss_and_grads(use_kernels):
    from longvl.eagle.configuration_eagle import tiny_eagle_config
    from longvl.eagle.modeling_eagle import EagleForConditionalGeneration
    from longvl.eagle.data.batch import PackedBatch

    torch.manual_seed(0)
    config = tiny_eagle_config(vocab_size=96, image_token_index=95)
    model = EagleForConditionalGeneration(config)
    if use_kernels:
        model.apply_kernels()
    generator = torch.Generator().manual_seed(1)
    tiles, rows = 3, 3 * config.tokens_per_tile
    text = torch.randint(0, 95, (29,), generator=generator)
    input_ids = torch.cat([text[:5], torch.full((rows,), 95), text[5:]])[None]
    image_index = torch.where(input_ids == 95, (input_ids == 95).long().cumsum(-1) - 1, -1)
    labels = torch.where(input_ids == 95, -100, input_ids.roll(-1, 1))
    labels[0, -1] = -100
    weights = torch.rand(labels.shape, generator=generator) * (labels != -100)
    pixels = torch.randn(tiles, 3, 56, 56, generator=generator)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # the kernels run where CUDA is
    model.to(device)
    batch = PackedBatch(input_ids=input_ids.to(device), position_ids=torch.arange(input_ids.shape[1])[None].to(device),
                        target_ids=labels.to(device), loss_weights=weights.to(device),
                        feature_index=image_index.to(device), cu_seqlens=None, pixel_values=pixels.to(device),
                        stats=None)
    loss = model.packed_loss(batch)
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}


def test_training_forward_with_kernels_matches_eager():
    """Triton RMSNorm / RoPE / SwiGLU patches and the fused weighted linear + CE against plain PyTorch.

    fp32 (the kernels take fp32 / bf16 / fp16): summation orders differ, so rtol 1e-5 on the loss, 2e-3 on grads.
    """
    want_loss, want = _tiny_forward_loss_and_grads(False)
    got_loss, got = _tiny_forward_loss_and_grads(True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7)
    assert all(g is not None for g in want.values())          # every parameter learns, the vision tower included
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=2e-3, atol=1e-5, msg=name)


def test_oom_is_reported_with_stage_and_length():
    from longvl.eagle.train.faults import report_oom

    with pytest.raises(torch.OutOfMemoryError, match=r"stage '64k' \(max_length 65536, this pack 60000 tokens, "
                                                     r"30000 per rank with cp=2"):
        with report_oom("64k", 65536, 60000, 2):
            raise torch.OutOfMemoryError("CUDA out of memory")
