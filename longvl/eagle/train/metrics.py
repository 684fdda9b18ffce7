"""Training metrics: model FLOPs (for MFU), a JSONL log, TensorBoard, a progress bar and a final PNG plot.

MFU convention (model FLOPs, as in PaLM / torchtitan): per trained token 6 x the LLM's non-embedding
parameters (the LM head included), plus attention 6 x n^2 x d_model per layer and per document of n tokens:
the QK^T and PV matmuls (4 n^2 d forward for full attention) are counted ONCE for causal attention, i.e. half,
times 3 for forward + backward. Packed documents never attend to each other, so the sum is per document. The
vision tower is included: 6 x its parameters per patch plus 12 x p^2 x d_vision per layer for each tile of p
patches (bidirectional), and the connector's 6 x parameters per visual token. Recomputation from activation
checkpointing is NOT counted (it is overhead, not model work). The peak is the device's dense bf16 datasheet
figure (H100/H200: 989 TFLOP/s), not a measured matmul rate.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

# Dense bf16 datasheet peaks in TFLOP/s, matched on the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "H800": 989.5, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def device_peak_tflops(override: float | None = None) -> float | None:
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


@dataclasses.dataclass
class FlopsModel:
    """The sizes MFU needs, read once from the model."""
    llm_params: int          # non-embedding LLM parameters (decoder layers + final norm + LM head)
    llm_layers: int
    llm_hidden: int
    vision_params: int = 0   # vision tower parameters (patch embedding included)
    vision_layers: int = 0
    vision_hidden: int = 0
    patches_per_tile: int = 0
    connector_params: int = 0

    def step_flops(self, doc_lengths: list[int], num_tiles: int, visual_tokens: int) -> float:
        """Model FLOPs of one forward + backward over packed documents and `num_tiles` image tiles."""
        tokens = sum(doc_lengths)
        flops = 6.0 * self.llm_params * tokens
        flops += 6.0 * self.llm_layers * self.llm_hidden * sum(float(n) * n for n in doc_lengths)
        p = self.patches_per_tile
        flops += num_tiles * (6.0 * self.vision_params * p + 12.0 * self.vision_layers * self.vision_hidden * p * p)
        flops += 6.0 * self.connector_params * visual_tokens
        return flops


class MetricsLogger:
    """Writes one JSON line per log step (rank 0), mirrors scalars to TensorBoard, drives a tqdm bar, plots."""

    def __init__(self, out_dir: str | os.PathLike, *, total_steps: int, enabled: bool = True,
                 tensorboard: bool = True, progress_bar: bool = True, plot: bool = True,
                 resume_from_step: int | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.records: list[dict] = []
        self.plot_enabled = plot
        self.writer = self.bar = self.file = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if resume_from_step is not None and self.path.exists():
            # Steps after the checkpoint were lost with the crash and will be trained again: drop them.
            self.records = [r for r in read_jsonl(self.path) if r["step"] <= resume_from_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.file = open(self.path, "a")
        missing_tensorboard = False
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional: JSONL and the plot still record everything
                missing_tensorboard = True
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        if missing_tensorboard:
            self.message("metrics.tensorboard is on but the tensorboard package is not installed: metrics go to "
                         f"{self.path} and the plot only (pip install tensorboard, or set metrics.tensorboard=false)")

    def advance_to(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])
        if self.bar is not None:
            self.bar.n = record["step"]
            loss = "skipped" if record["loss"] is None else f"{record['loss']:.4f}"
            self.bar.set_postfix(stage=record.get("stage"), loss=loss,
                                 tok_s_gpu=f"{record['tokens_per_s_per_gpu']:.0f}", refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> Path | None:
        """Close the outputs and, if asked, plot loss and throughput; return the PNG path."""
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.file.close()
        if self.plot_enabled and self.records:
            return plot_metrics(self.path, self.out_dir / "metrics.png")
        return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(jsonl_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Loss and tokens/s per GPU against the step, stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(jsonl_path) if r.get("loss") is not None]
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_tput) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], lw=1)
    ax_loss.set_ylabel("loss")
    ax_tput.plot(steps, [r["tokens_per_s_per_gpu"] for r in records], lw=1, color="tab:orange")
    ax_tput.set_ylabel("tokens/s per GPU")
    ax_tput.set_xlabel("step")
    for prev, cur in zip(records, records[1:]):
        if cur.get("stage") != prev.get("stage"):
            for ax in (ax_loss, ax_tput):
                ax.axvline(cur["step"] - 0.5, color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
