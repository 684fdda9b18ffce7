"""The progressive long-context trainer: stages of growing length on FSDP2 x context parallelism.

`train(config)` builds the model once (sharded by FSDP2 over every rank), then runs the stages in order.
Each stage is a `Stage` (its mesh, context-parallel layout and schedule) with its own resumable loader; its
end is a checkpoint. A step (`train_step`): this rank's shard of the next packed sequence -> the model's
`packed_loss` (vision on local tiles, features exchanged, LLM with context-parallel attention, fused
weighted cross-entropy) -> agreed finiteness check -> backward -> grad-norm clip -> AdamW.
The order of modules one step passes through is written out in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from longvl.eagle.data.batch import PackedBatch
from longvl.eagle.data.loader import is_empty_pack
from longvl.eagle.train import stage_data
from longvl.eagle.train.checkpoint import Checkpointer, export_hf, rng_state, set_rng_state
from longvl.eagle.train.config import TrainConfig, to_dict
from longvl.eagle.train.faults import NonFiniteGuard, all_finite, report_oom
from longvl.eagle.train.metrics import FlopsModel, MetricsLogger, device_peak_tflops
from longvl.eagle.train.offload import CPUOffloadHooks, apply_activation_checkpointing
from longvl.eagle.train.parallel_dims import build_fsdp_mesh, init_distributed
from longvl.eagle.train.signals import StopRequest
from longvl.eagle.train.stage import Stage
from longvl.kernels.tiled_mlp import tile_mlp
from longvl.parallel.hf import ATTENTION_NAME

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def use_deterministic_kernels() -> None:
    """Make every GPU kernel of a step deterministic, or fail loudly where one is not (before CUDA starts)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(True)


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """model.dtype, with "auto" = bfloat16 on a GPU (fast, no loss scaling needed) and float32 on CPU."""
    if config.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[config.model.dtype]


def build_model(config: TrainConfig, vocab_size: int, image_token_index: int):
    """The Eagle model: a checkpoint directory, or a named size with random weights (seeded, same on all ranks)."""
    from longvl.eagle.configuration_eagle import eagle2_5_8b_config, tiny_eagle_config
    from longvl.eagle.modeling_eagle import EagleForConditionalGeneration

    if config.model.pretrained:
        return EagleForConditionalGeneration.from_pretrained(config.model.pretrained, attn_implementation="sdpa",
                                                             dtype=torch.float32)
    if config.model.size == "tiny":
        model_config = tiny_eagle_config(vocab_size, image_token_index)
    else:
        model_config = eagle2_5_8b_config()
    for sub in (model_config, model_config.vision_config, model_config.text_config):
        sub._attn_implementation = "sdpa"   # the LLM's is switched to context-parallel attention later
    torch.manual_seed(config.seed)
    return EagleForConditionalGeneration(model_config)


def check_tokenizer_fits(model_config, data_info) -> None:
    """The processor's `<IMG_CONTEXT>` id and vocabulary must be the model's, or training is silently wrong."""
    if data_info.image_token_index != model_config.image_token_index:
        raise ValueError(f"the tokenizer's <IMG_CONTEXT> id is {data_info.image_token_index} but the model's "
                         f"image_token_index is {model_config.image_token_index}: set data.tokenizer to the model's "
                         f"tokenizer folder (the built-in tiny tokenizer only fits model.size=tiny)")
    if data_info.vocab_size > model_config.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {data_info.vocab_size} tokens, more than the model's vocabulary of "
                         f"{model_config.text_config.vocab_size}")


def flops_model(model) -> FlopsModel:
    cfg = model.config
    lm = model.language_model
    embed = lm.get_input_embeddings().weight.numel()
    vision = model.vision_model.vision_model
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return FlopsModel(
        llm_params=sum(p.numel() for p in lm.parameters()) - embed,
        llm_layers=cfg.text_config.num_hidden_layers, llm_hidden=cfg.text_config.hidden_size,
        vision_params=sum(p.numel() for p in vision.parameters()),
        vision_layers=cfg.vision_config.num_hidden_layers, vision_hidden=cfg.vision_config.hidden_size,
        patches_per_tile=grid * grid, connector_params=sum(p.numel() for p in model.mlp1.parameters()))


def kernels_enabled(config: TrainConfig, device: torch.device) -> bool:
    return config.kernels.enabled and (device.type == "cuda" or config.kernels.on_cpu)


def prepare_model(config: TrainConfig, model, device: torch.device, fsdp_mesh):
    """Kernels, context-parallel attention, activation checkpointing (+ offload) and FSDP2 sharding, in place.

    The model itself is the FSDP root, with `packed_loss` registered as a forward method. Returns the
    activation-offload hooks (None when offload is off)."""
    if kernels_enabled(config, device):
        kernels = config.kernels
        model.apply_kernels(rms_norm=kernels.rms_norm, rope=kernels.rope, swiglu=kernels.swiglu,
                            linear_cross_entropy=kernels.linear_cross_entropy,
                            loss_chunking=kernels.loss_chunking, lm_head_grad_dtype=kernels.lm_head_grad_dtype)
    if config.memory.tiled_mlp_tokens:
        for layer in model.language_model.model.layers:
            tile_mlp(layer.mlp, config.memory.tiled_mlp_tokens)
    if config.memory.vision_micro_batch:
        model.config.vision_micro_batch = config.memory.vision_micro_batch
    model.language_model.config._attn_implementation = ATTENTION_NAME   # the vision tower keeps sdpa
    model.config.text_config._attn_implementation = ATTENTION_NAME
    if device.type == "cuda":
        # torch's sdpa dispatch prefers cuDNN on Hopper, and cuDNN builds an execution plan for every new shape: the
        # vision tower's batch (the pack's tile count) changes every step (the bf16 demo's steps took twice as long).
        torch.backends.cuda.enable_cudnn_sdp(False)
    llm_layers = list(model.language_model.model.layers)
    vision_layers = list(model.vision_model.vision_model.encoder.layers)
    offload = CPUOffloadHooks(device_copy=device.type != "cuda") if config.memory.offload_activations else None
    for layers in (llm_layers, vision_layers):
        apply_activation_checkpointing(layers, config.memory.activation_checkpointing, config.memory.ac_every,
                                       offload)
    dtype = compute_dtype(config, device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=DTYPES[config.model.reduce_dtype])
    root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                   cast_forward_inputs=False)  # keep the fp32 loss weights fp32
    extra = {"offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda")} if config.memory.offload_params else {}
    for layer in vision_layers + llm_layers:
        fully_shard(layer, mesh=fsdp_mesh, mp_policy=mp, **extra)
    fully_shard(model.vision_model, mesh=fsdp_mesh, mp_policy=mp, **extra)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=root_mp, **extra)
    register_fsdp_forward_method(model, "packed_loss")
    if not config.memory.offload_params:
        model.to(device)
    return offload


def build_optimizer(config: TrainConfig, model) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.stages[0].lr, betas=config.optim.betas, eps=config.optim.eps,
                             foreach=True)


def train_step(model, optimizer, batch: PackedBatch, stage: Stage, *, guard: NonFiniteGuard,
               max_grad_norm: float, step: int):
    """Forward, agreed finiteness check, backward, clip, AdamW on this rank's shard `batch` of a pack.

    Returns (this shard's weighted loss sum, the global grad norm, whether the update was applied). A step
    where no rank holds a supervised token (every sample of every pack was bad) is skipped on all ranks: an
    update from zero gradients would still move the weights (momentum, weight decay).
    """
    real = torch.tensor([float(not is_empty_pack(batch))], device=batch.input_ids.device)
    dist.all_reduce(real)
    packs = real.item() / stage.cp   # packs with something to learn, over the data-parallel ranks
    if packs == 0:
        optimizer.zero_grad(set_to_none=True)
        return None, math.nan, False
    loss = model.packed_loss(batch, stage.sequence(batch))
    finite = guard.record(all_finite(loss), step=step, stage=stage.name, what="loss")
    if finite:
        # FSDP averages gradients over all dp x cp ranks; a pack's loss is the sum over its cp shards, and
        # the step's gradient is the mean over the packs with something to learn.
        (loss * (dist.get_world_size() / packs)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf,
                                          foreach=True)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    applied = finite and guard.record(all_finite(norm), step=step, stage=stage.name, what="gradient norm")
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, float(norm), applied


class Trainer:
    """Holds the run's state across stages; `run()` trains every remaining stage."""

    def __init__(self, config: TrainConfig):
        self.config = config
        if config.deterministic:
            use_deterministic_kernels()
        self.rank, self.world, self.device = init_distributed()
        torch.manual_seed(config.seed)
        self.fsdp_mesh = build_fsdp_mesh(self.world)
        self.data_info = stage_data.prepare(config, self.rank)
        self.model = build_model(config, self.data_info.vocab_size, self.data_info.image_token_index)
        check_tokenizer_fits(self.model.config, self.data_info)
        self.flops = flops_model(self.model)
        self.offload = prepare_model(config, self.model, self.device, self.fsdp_mesh)
        self.optimizer = build_optimizer(config, self.model)
        self.checkpointer = Checkpointer(config.checkpoint.dir, async_save=config.checkpoint.async_save,
                                         keep=config.checkpoint.keep)
        self.guard = NonFiniteGuard(config.faults.max_consecutive_nonfinite)
        self.stage_index, self.stage_step, self.global_step = 0, 0, 0
        self.data_state = None
        self.bad_samples = Counter()   # samples skipped at load time, by reason, over the whole run
        self.empty_steps = 0           # steps skipped because no rank had a real document
        self.peak_tflops = device_peak_tflops(config.metrics.peak_tflops)
        resumed = self._maybe_resume()
        self.metrics = MetricsLogger(config.metrics.dir, total_steps=self._total_steps(), enabled=self.rank == 0,
                                     tensorboard=config.metrics.tensorboard,
                                     progress_bar=config.metrics.progress_bar, plot=config.metrics.plot,
                                     resume_from_step=self.global_step if resumed else None)
        self.metrics.advance_to(self.global_step)
        if self.device.type == "cpu" and config.kernels.enabled and config.kernels.on_cpu:
            self.metrics.message("kernels run on CPU through Triton's interpreter: exact, but about 30x slower "
                                 "than eager PyTorch (set kernels.on_cpu=false to train faster on CPU)")

    def _total_steps(self) -> int:
        from longvl.eagle.train.stage import stage_steps

        return sum(stage_steps(s, self.world // s.cp) for s in self.config.stages)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _maybe_resume(self) -> bool:
        latest = self.checkpointer.latest() if self.config.checkpoint.resume else None
        if latest is None:
            return False
        trainer_state, rank_state = self.checkpointer.load(latest, self.model, self.optimizer)
        self.stage_index, self.stage_step = trainer_state["stage"], trainer_state["stage_step"]
        self.global_step = trainer_state["global_step"]
        self.guard.load_state_dict(trainer_state["faults"])
        self.bad_samples.update(trainer_state.get("bad_samples", {}))
        self.empty_steps = trainer_state.get("empty_steps", 0)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            self.data_state = rank_state["data"]
        if self.rank == 0:
            print(f"resumed from {latest} (stage {self.stage_index}, step {self.global_step})", flush=True)
        return True

    def save(self, data_state) -> None:
        trainer_state = {"stage": self.stage_index, "stage_step": self.stage_step, "global_step": self.global_step,
                         "faults": self.guard.state_dict(), "bad_samples": dict(self.bad_samples),
                         "empty_steps": self.empty_steps, "config": to_dict(self.config)}
        rank_state = {"rng": rng_state(), "data": data_state}
        self.checkpointer.save(self.global_step, self.model, self.optimizer, trainer_state, rank_state)

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.stop = StopRequest()   # SIGTERM / SIGINT: checkpoint at the next step boundary, then exit
        try:
            while self.stage_index < len(self.config.stages):
                self.run_stage(Stage.build(self.config.stages[self.stage_index], self.fsdp_mesh,
                                           self.model.config.text_config))
                self.stage_index += 1
                self.stage_step = 0
                self.data_state = None
                if self.stage_index < len(self.config.stages):
                    self.save(None)  # stage boundary: the next stage starts from here
            self.save(None)
            self.checkpointer.wait()
            if self.config.checkpoint.export_hf:
                out = export_hf(self.model, f"{self.config.checkpoint.dir}/hf", config=self.model.config,
                                tokenizer=stage_data.load_tokenizer(self.config.data.tokenizer))
                if out is not None:
                    self.metrics.message(f"exported a Hugging Face model folder to {out} (AutoModel / "
                                         f"AutoProcessor.from_pretrained after `import longvl.eagle`)")
        finally:
            self.checkpointer.close()
            png = self.metrics.close()
            if png is not None:
                print(f"metrics: {self.metrics.path}  plot: {png}", flush=True)
            self.stop.close()   # last: a launcher's SIGTERM to the remaining ranks must not cut this short

    def run_stage(self, stage: Stage) -> None:
        loader = stage_data.StageLoader(self.config, self.data_info, self.model.config, stage.config,
                                        stage.mesh.dp_rank, stage.mesh.dp, state=self.data_state)
        self.metrics.message(stage.describe())
        batches = iter(loader)
        while self.stage_step < stage.steps:
            t0 = time.perf_counter()
            batch = next(batches)
            shard = stage.shard(batch, self.device)
            t_data = time.perf_counter() - t0
            lr = stage.learning_rate(self.stage_step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.offload is not None:
                self.offload.reset()
            with report_oom(stage.name, stage.config.max_length, batch.stats.tokens, stage.cp):
                loss, grad_norm, applied = train_step(self.model, self.optimizer, shard, stage, guard=self.guard,
                                                      max_grad_norm=self.config.optim.max_grad_norm,
                                                      step=self.global_step + 1)
            self.empty_steps += loss is None
            self.stage_step += 1
            self.global_step += 1
            step_time = time.perf_counter() - t0
            if self.global_step % self.config.metrics.log_every == 0 or self.stage_step == stage.steps:
                self.log(stage, batch, loss, grad_norm, lr, step_time, t_data, applied)
            interval = self.config.checkpoint.interval
            if interval and self.global_step % interval == 0 and self.stage_step < stage.steps:
                self.save(loader.state_dict())
            self.checkpointer.poll()
            signum = self.stop.agreed()   # collective: every rank stops after the same step
            if signum:
                self.save(loader.state_dict())
                raise self.stop.stopped(signum, self.global_step, self.checkpointer.wait())
        self._report_bad_samples(stage, loader)

    def _report_bad_samples(self, stage: Stage, loader) -> None:
        """One line per stage (counts by reason); every sample with its file, position and reason in a file."""
        self.bad_samples.update(loader.bad_sample_counts())
        suffix = f"-rank{self.rank}" if self.world > 1 else ""   # load-time skips differ per data-parallel rank
        path = Path(self.config.metrics.dir) / f"bad_samples-{stage.name}{suffix}.jsonl"
        loader.write_bad_samples(path)
        self.metrics.message(f"stage {stage.name}: {loader.bad_sample_summary()}; details in {path}")

    def log(self, stage: Stage, batch: PackedBatch, loss, grad_norm, lr, step_time, t_data, applied) -> None:
        stats = batch.stats
        flops = self.flops.step_flops(stats.doc_lengths, stats.tiles, stats.tiles * self.model.config.tokens_per_tile)
        totals = torch.tensor([stats.tokens, flops / stage.cp, 0.0 if loss is None else float(loss.detach())],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        tokens, flops = float(totals[0]) / stage.cp, float(totals[1])
        record = {"step": self.global_step, "stage": stage.name, "max_length": stage.config.max_length,
                  "loss": float(totals[2]) / stage.mesh.dp if loss is not None else None, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s_per_gpu": tokens / step_time / self.world,
                  "step_time_s": step_time, "data_share": t_data / step_time, "applied": applied,
                  "skipped_steps": self.guard.total, "empty_steps": self.empty_steps,
                  "bad_samples": dict(self.bad_samples), "docs": stats.docs, "images": stats.images,
                  "frames": stats.frames}
        if self.peak_tflops:
            record["mfu"] = flops / step_time / self.world / (self.peak_tflops * 1e12)
        if torch.cuda.is_available():
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self.metrics.log(record)


def train(config: TrainConfig) -> None:
    Trainer(config).run()
