"""The progressive long-context trainer: stages of growing length on FSDP2 x context parallelism.

`train(config)` builds the model once (sharded by FSDP2 over every rank), then runs the stages in order.
Each stage rebuilds the dp x cp mesh, the packing at its max length and the learning-rate schedule; its
end is a checkpoint. A step: next packed sequence -> this rank's context-parallel shard -> forward (vision
on local tiles, features exchanged, LLM with CP attention, fused weighted CE) -> agreed finiteness check ->
backward (loss x cp: FSDP averages over dp x cp ranks, a pack's loss is the SUM over its cp shards) -> grad
norm clip -> AdamW -> metrics -> checkpoint at intervals.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from longvl.eagle.train import context_parallel, data as train_data
from longvl.eagle.train.checkpoint import Checkpointer, export_hf, rng_state, set_rng_state
from longvl.eagle.train.config import StageConfig, TrainConfig, to_dict
from longvl.eagle.train.faults import NonFiniteGuard, all_finite, report_oom
from longvl.eagle.train.forward import EagleTrainingForward
from longvl.eagle.train.metrics import FlopsModel, MetricsLogger, device_peak_tflops
from longvl.eagle.train.offload import CPUOffloadHooks, apply_activation_checkpointing
from longvl.eagle.train.parallel_dims import build_fsdp_mesh, build_stage_mesh, init_distributed
from longvl.eagle.train.signals import StopRequest

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def stage_steps(stage: StageConfig, dp: int) -> int:
    if stage.steps is not None:
        return int(stage.steps)
    return max(1, math.ceil(stage.tokens / (stage.max_length * dp)))


def learning_rate(stage: StageConfig, step: int, total: int) -> float:
    """Linear warmup over `warmup_fraction` of the stage, then cosine down to `min_lr_ratio` x lr."""
    warmup = math.ceil(stage.warmup_fraction * total)
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = stage.lr * stage.min_lr_ratio
    return floor + (stage.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(config: TrainConfig, vocab_size: int, image_token_index: int):
    """The Eagle model: a checkpoint directory, or a named size with random weights (seeded, same on all ranks)."""
    from longvl.eagle.configuration_eagle import eagle2_5_8b_config, tiny_eagle_config
    from longvl.eagle.modeling_eagle import EagleForConditionalGeneration

    if config.model.pretrained:
        return EagleForConditionalGeneration.from_pretrained(config.model.pretrained, attn_implementation="sdpa",
                                                             dtype=torch.float32)
    if config.model.size == "tiny":
        model_config = tiny_eagle_config(vocab_size, image_token_index)
    elif config.model.size == "eagle25-8b":
        model_config = eagle2_5_8b_config()
    else:
        raise ValueError(f"model.size must be tiny or eagle25-8b (or set model.pretrained), got {config.model.size!r}")
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


def prepare_model(config: TrainConfig, model, device: torch.device, fsdp_mesh) -> tuple:
    """Kernels, activation checkpointing (+ offload) and FSDP2 sharding; returns (training module, offload hooks)."""
    kernels_on = config.kernels.enabled and (device.type == "cuda" or config.kernels.on_cpu)
    if kernels_on:
        model.apply_kernels(rms_norm=config.kernels.rms_norm, rope=config.kernels.rope,
                            swiglu=config.kernels.swiglu, linear_cross_entropy=False)
    context_parallel.install_attention(model)
    llm_layers = list(model.language_model.model.layers)
    vision_layers = list(model.vision_model.vision_model.encoder.layers)
    offload = None
    if config.memory.offload_activations:
        offload = CPUOffloadHooks(device_copy=device.type != "cuda")
    for layers in (llm_layers, vision_layers):
        apply_activation_checkpointing(layers, config.memory.activation_checkpointing, config.memory.ac_every,
                                       offload)
    module = EagleTrainingForward(model, fused_cross_entropy=kernels_on and config.kernels.linear_cross_entropy)
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[config.model.dtype], reduce_dtype=DTYPES[config.model.reduce_dtype])
    root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                   cast_forward_inputs=False)  # keep the fp32 loss weights fp32
    extra = {"offload_policy": CPUOffloadPolicy()} if config.memory.offload_params else {}
    for layer in vision_layers + llm_layers:
        fully_shard(layer, mesh=fsdp_mesh, mp_policy=mp, **extra)
    fully_shard(model.vision_model, mesh=fsdp_mesh, mp_policy=mp, **extra)
    fully_shard(module, mesh=fsdp_mesh, mp_policy=root_mp, **extra)
    if not config.memory.offload_params:
        module.to(device)
    return module, offload


def build_optimizer(config: TrainConfig, module) -> torch.optim.Optimizer:
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.stages[0].lr, betas=config.optim.betas, eps=config.optim.eps,
                             foreach=True)


def train_step(module, optimizer, shard: dict, cp_attention, cp: int, max_grad_norm: float, guard: NonFiniteGuard,
               *, step: int, stage_name: str, offload: CPUOffloadHooks | None = None):
    """Forward, agreed finiteness check, backward, clip, AdamW on this rank's shard.

    Returns (this shard's weighted loss sum, the global grad norm, whether the update was applied).
    """
    if offload is not None:
        offload.reset()
    with cp_attention.active(shard):  # forward and backward: checkpointed layers recompute attention
        loss = module(**shard["inputs"])
        finite = guard.record(all_finite(loss), step=step, stage=stage_name, what="loss")
        if finite:
            (loss * cp).backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf,
                                          foreach=True)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    applied = finite and guard.record(all_finite(norm), step=step, stage=stage_name, what="gradient norm")
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, float(norm), applied


class Trainer:
    """Holds the run's state across stages; `run()` trains every remaining stage."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.rank, self.world, self.device = init_distributed()
        torch.manual_seed(config.seed)
        self.fsdp_mesh = build_fsdp_mesh(self.world)
        self.data_info = train_data.prepare(config, self.rank)
        model = build_model(config, self.data_info.vocab_size, self.data_info.image_token_index)
        check_tokenizer_fits(model.config, self.data_info)
        self.flops = flops_model(model)
        self.hf_config = model.config
        self.module, self.offload = prepare_model(config, model, self.device, self.fsdp_mesh)
        self.optimizer = build_optimizer(config, self.module)
        self.checkpointer = Checkpointer(config.checkpoint.dir, async_save=config.checkpoint.async_save,
                                         keep=config.checkpoint.keep)
        self.guard = NonFiniteGuard(config.faults.max_consecutive_nonfinite)
        self.stage_index, self.stage_step, self.global_step = 0, 0, 0
        self.data_state = None
        self.total_steps = sum(stage_steps(s, self.world // s.cp) for s in config.stages)
        self.peak_tflops = device_peak_tflops(config.metrics.peak_tflops)
        resumed = self._maybe_resume()
        self.metrics = MetricsLogger(config.metrics.dir, total_steps=self.total_steps, enabled=self.rank == 0,
                                     tensorboard=config.metrics.tensorboard,
                                     progress_bar=config.metrics.progress_bar, plot=config.metrics.plot,
                                     resume_from_step=self.global_step if resumed else None)
        self.metrics.advance_to(self.global_step)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _maybe_resume(self) -> bool:
        latest = self.checkpointer.latest() if self.config.checkpoint.resume else None
        if latest is None:
            return False
        trainer_state, rank_state = self.checkpointer.load(latest, self.module, self.optimizer)
        self.stage_index, self.stage_step = trainer_state["stage"], trainer_state["stage_step"]
        self.global_step = trainer_state["global_step"]
        self.guard.load_state_dict(trainer_state["faults"])
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            self.data_state = rank_state["data"]
        if self.rank == 0:
            print(f"resumed from {latest} (stage {self.stage_index}, step {self.global_step})", flush=True)
        return True

    def save(self, data_state) -> None:
        trainer_state = {"stage": self.stage_index, "stage_step": self.stage_step, "global_step": self.global_step,
                         "faults": self.guard.state_dict(), "config": to_dict(self.config)}
        rank_state = {"rng": rng_state(), "data": data_state}
        self.checkpointer.save(self.global_step, self.module, self.optimizer, trainer_state, rank_state)

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.stop = StopRequest()   # SIGTERM / SIGINT: checkpoint at the next step boundary, then exit
        try:
            while self.stage_index < len(self.config.stages):
                self.run_stage(self.config.stages[self.stage_index])
                self.stage_index += 1
                self.stage_step = 0
                self.data_state = None
                if self.stage_index < len(self.config.stages):
                    self.save(None)  # stage boundary: the next stage starts from here
            self.save(None)
            self.checkpointer.wait()
            if self.config.checkpoint.export_hf:
                out = export_hf(self.module, f"{self.config.checkpoint.dir}/hf", strip_prefix="model.",
                                config=self.hf_config)
                if out is not None:
                    self.metrics.message(f"exported HF safetensors to {out}")
        finally:
            self.checkpointer.close()
            png = self.metrics.close()
            if png is not None:
                print(f"metrics: {self.metrics.path}  plot: {png}", flush=True)
            self.stop.close()   # last: a launcher's SIGTERM to the remaining ranks must not cut this short

    def run_stage(self, stage: StageConfig) -> None:
        mesh = build_stage_mesh(self.fsdp_mesh, stage.cp, stage.ulysses)
        self.module.set_cp_group(mesh.cp_group if stage.cp > 1 else None, mesh.cp_rank, stage.cp)
        cp_attention = context_parallel.StageAttention(mesh, stage, self.hf_config.text_config,
                                                       self.hf_config.image_token_index)
        total = stage_steps(stage, mesh.dp)
        loader = train_data.StageLoader(self.config, self.data_info, self.hf_config, stage, mesh.dp_rank, mesh.dp,
                                        state=self.data_state)
        layout = f"cp {stage.cp} ({cp_attention.algorithm})" if stage.cp > 1 else "no context parallelism"
        self.metrics.message(f"stage {stage.name}: max_length {stage.max_length}, {layout}, dp {mesh.dp}, "
                             f"{total} steps")
        batches = iter(loader)
        while self.stage_step < total:
            t0 = time.perf_counter()
            batch = next(batches)
            shard = cp_attention.shard(batch, self.device)
            t_data = time.perf_counter() - t0
            lr = learning_rate(stage, self.stage_step, total)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with report_oom(stage.name, stage.max_length, batch["num_tokens"], stage.cp):
                loss, grad_norm, applied = self.train_step(shard, cp_attention, stage, mesh)
            self.stage_step += 1
            self.global_step += 1
            step_time = time.perf_counter() - t0
            if self.global_step % self.config.metrics.log_every == 0 or self.stage_step == total:
                self.log(stage, batch, loss, grad_norm, lr, step_time, t_data, applied)
            interval = self.config.checkpoint.interval
            if interval and self.global_step % interval == 0 and self.stage_step < total:
                self.save(loader.state_dict())
            self.checkpointer.poll()
            signum = self.stop.agreed()   # collective: every rank stops after the same step
            if signum:
                self.save(loader.state_dict())
                raise self.stop.stopped(signum, self.global_step, self.checkpointer.wait())

    def train_step(self, shard: dict, cp_attention, stage: StageConfig, mesh):
        loss, norm, applied = train_step(self.module, self.optimizer, shard, cp_attention, stage.cp,
                                         self.config.optim.max_grad_norm, self.guard, step=self.global_step + 1,
                                         stage_name=stage.name, offload=self.offload)
        # Report the pack loss averaged over data-parallel ranks (a pack's loss is the sum of its cp shards).
        total = loss.detach().float().reshape(1).to(self.device)
        dist.all_reduce(total)
        return float(total) / mesh.dp, norm, applied

    def log(self, stage, batch, loss, grad_norm, lr, step_time, t_data, applied) -> None:
        flops = self.flops.step_flops(batch["doc_lengths"], batch["num_tiles_total"], batch["num_image_rows"])
        stats = torch.tensor([batch["num_tokens"], flops / stage.cp],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        tokens, flops = float(stats[0]) / stage.cp, float(stats[1])
        record = {"step": self.global_step, "stage": stage.name, "max_length": stage.max_length, "loss": loss,
                  "lr": lr, "grad_norm": grad_norm, "tokens_per_s_per_gpu": tokens / step_time / self.world,
                  "step_time_s": step_time, "data_share": t_data / step_time, "applied": applied,
                  "skipped_total": self.guard.total, "docs": batch["stats"]["docs"],
                  "images": batch["stats"]["images"], "frames": batch["stats"]["frames"]}
        if self.peak_tflops:
            record["mfu"] = flops / step_time / self.world / (self.peak_tflops * 1e12)
        if torch.cuda.is_available():
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self.metrics.log(record)


def train(config: TrainConfig) -> None:
    Trainer(config).run()
