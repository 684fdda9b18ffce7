"""The README main job on one GPU: the demo trainer in fp32 and bf16, kernels on and off (skipped without CUDA).

Each run is the real command (`python -m longvl.eagle.train --config demo ...`) in a subprocess on the demo's
generated data. Checked: every loss finite, the loss falls, kernels-on and kernels-off curves agree, a run
killed with SIGKILL and resumed gives the identical curve, and the HF export loads back and runs.

Kernels on vs off: the same math in another summation order (fused RMSNorm / RoPE / SwiGLU / linear + CE), so
the curves separate slowly through training. Tolerance on every step's loss, relative: fp32 1e-3, bf16 3e-2
(bf16 rounds every activation to 8 bits of mantissa, 0.4 % per rounding, over 34 steps of training).
"""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longvl.eagle.train.metrics import read_jsonl
from tests.test_train_e2e import REPO, _kill_after_step

pytestmark = pytest.mark.gpu
CURVE_RTOL = {"float32": 1e-3, "bfloat16": 3e-2}
RUNS = {}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from longvl.eagle.data.synthetic import generate

    folder = tmp_path_factory.mktemp("demo_data")
    generate(str(folder), num=96, seed=0)   # the demo preset's data.num_samples
    return folder


def _command(folder: Path, data: Path, overrides):
    return [sys.executable, "-m", "longvl.eagle.train", "--config", "demo", f"--data.dir={data}",
            f"--checkpoint.dir={folder / 'ckpt'}", f"--metrics.dir={folder / 'metrics'}",
            "--metrics.progress_bar=false", *overrides]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def _demo(folder: Path, data: Path, *overrides) -> list[dict]:
    result = subprocess.run(_command(folder, data, overrides), cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return read_jsonl(folder / "metrics" / "metrics.jsonl")


def _run(tmp_path_factory, data, dtype, kernels):
    key = (dtype, kernels)
    if key not in RUNS:
        folder = tmp_path_factory.mktemp(f"demo_{dtype}_{'kernels' if kernels else 'eager'}")
        start = time.perf_counter()
        records = _demo(folder, data, f"--model.dtype={dtype}", f"--kernels.enabled={str(kernels).lower()}")
        RUNS[key] = (folder, records, time.perf_counter() - start)
    return RUNS[key]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_trains_finite_and_learns(tmp_path_factory, demo_data, dtype, kernels):
    folder, records, seconds = _run(tmp_path_factory, demo_data, dtype, kernels)
    losses = [r["loss"] for r in records]
    assert len(losses) == 34 and all(loss is not None and math.isfinite(loss) for loss in losses), losses
    assert all(r["applied"] for r in records) and records[-1]["skipped_steps"] == 0
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 1.0, (first, last)   # the demo's loss falls by more than a nat
    tokens = sum(r["tokens_per_s_per_gpu"] * r["step_time_s"] for r in records)
    print(f"\n{dtype} kernels={kernels}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, {len(losses)} steps, "
          f"{tokens / sum(r['step_time_s'] for r in records):.0f} tokens/s, run {seconds:.1f} s")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_on_and_off_curves_agree(tmp_path_factory, demo_data, dtype):
    on = [r["loss"] for r in _run(tmp_path_factory, demo_data, dtype, True)[1]]
    off = [r["loss"] for r in _run(tmp_path_factory, demo_data, dtype, False)[1]]
    worst = max(abs(a - b) / abs(b) for a, b in zip(on, off))
    print(f"\n{dtype}: kernels on vs off, largest relative loss difference {worst:.2e}")
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=CURVE_RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_loads_back_and_generates(tmp_path_factory, demo_data, dtype):
    from transformers import AutoModel, AutoProcessor

    import longvl.eagle  # noqa: F401  (registers the Auto classes)

    folder = _run(tmp_path_factory, demo_data, dtype, True)[0] / "ckpt" / "hf"
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=processor.apply_chat_template([{"role": "user", "content": "Say something."}],
                                                          add_generation_prompt=True), return_tensors="pt").to("cuda")
    logits = model(**inputs).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size and torch.isfinite(logits).all()
    assert model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 4


def test_kill_and_resume_gives_the_identical_curve(tmp_path, demo_data):
    """bf16 with kernels on and deterministic kernels: SIGKILL after step 12, resume from the step-10 checkpoint."""
    overrides = ["--model.dtype=bfloat16", "--deterministic=true", "--checkpoint.interval=5",
                 "--checkpoint.export_hf=false", "--metrics.plot=false"]
    reference = _demo(tmp_path / "reference", demo_data, *overrides)
    folder = tmp_path / "killed"
    proc = subprocess.Popen(_command(folder, demo_data, overrides), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed_at = _kill_after_step(proc, folder / "metrics" / "metrics.jsonl", 12, timeout=600)
    assert killed_at < 34, "the run ended before it could be killed"
    resumed = _demo(folder, demo_data, *overrides)
    assert [r["step"] for r in resumed] == list(range(1, 35))
    curve = [(r["loss"], r["grad_norm"]) for r in resumed]
    expected = [(r["loss"], r["grad_norm"]) for r in reference]
    differ = [step for step, (mine, ref) in enumerate(zip(curve, expected), 1) if mine != ref]
    # a first difference at or before the resumed checkpoint's step is a rerun that is not deterministic
    assert not differ, (f"steps {differ} differ; first: step {differ[0]} (loss, grad_norm) resumed "
                        f"{curve[differ[0] - 1]} vs uninterrupted {expected[differ[0] - 1]}")
