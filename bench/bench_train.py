"""End-to-end training-step benchmark of the Eagle 2.5 8B shapes (a torchrun script, not a pytest file).

    torchrun --nproc-per-node 4 -m bench.bench_train                 # everything below, on 4 x H200
    torchrun --nproc-per-node 4 -m bench.bench_train --parts ladder  # one part: max_dp, max_cp, ladder, cp_algorithms, pieces, data
    torchrun --nproc-per-node 2 -m bench.bench_train --size tiny --parts ladder,pieces --ladder 512 \
        --pieces-length 512 --tiles 2   # checks the script on CPU in a minute
    torchrun --nproc-per-node 2 -m bench.bench_train --size tiny --parts data --data-length 2048 \
        --data-samples 64 --data-long-videos 2 --data-workers 1 --data-steps 3   # the data part on CPU

Model: SigLIP so400m 448/14 + Qwen2.5-7B, random weights, bf16 compute with fp32 master
weights and fp32 gradient reduction, FSDP2 over all ranks, AdamW; one packed sequence per data-parallel
rank per step: one document of the given length with `--tiles` 448-pixel tiles (256 tokens each) and text.
A step is the trainer's own `train_step` (forward, backward, clip, optimizer step); times are medians of
wall-clock steps after warm-up (each step ends with a host sync: loss and grad norm), max over ranks.

Parts:
- max_dp: the longest sequence per GPU without context parallelism (cp = 1), doubling-then-halving search;
  the goal is >= 64K tokens per GPU.
- max_cp: the longest sequence with cp = world size; the goal is >= 256K.
- ladder: tokens/s per GPU and MFU at 32K, 64K and 128K (cp as small as fits); goal at 128K >= 2,000 tok/s/GPU.
- cp_algorithms: at one length with cp = world size, each context-parallel algorithm (the hybrids as Ulysses 2
  x ring / all-gather) in the full training step.
- pieces: at one length, what each piece buys: kernels off, offload off, selective instead of full
  activation checkpointing.
- longest_1gpu (not in the default parts; run with one process and --preset eagle25-8b-1gpu): the longest
  packed sequence one GPU trains, doubling then bisecting, for the Eagle shapes with --tiles image tiles and for
  the text-only Qwen2.5-7B (--tiles 0 too: one record each), with step time, tokens/s, MFU, peak GPU and host memory.
- data (not in the default parts): the share of step time spent on data loading (goal < 5 % at 32K per GPU,
  issue #9) with the trainer's own loader (longvl/eagle/train/stage_data.py: offline index, spawn workers, packing, ADS)
  on the generated dataset's video-heavy mixture (65 % video draws) with long 720p videos added, cp = 1.
MFU follows longvl/eagle/train/metrics.py (model FLOPs, causal attention counted once, vision tower included,
datasheet dense bf16 peak). Records: op "train_step", provider = the variant, value = tokens/s per GPU.
"""
import argparse
import dataclasses
import gc
import math
import os
import resource
import statistics
import tempfile
import time

from longvl import kernels  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA before any kernel is defined)
import torch
import torch.distributed as dist

from bench.harness import ON_GPU, Record, device_ceilings, save_results
from longvl.eagle.data.collate import collate_pack
from longvl.eagle.data.dataset import ProcessedPack
from longvl.eagle.data.synthetic import generate
from longvl.eagle.train import stage_data
from longvl.eagle.train.config import StageConfig, load_config
from longvl.eagle.train.faults import NonFiniteGuard
from longvl.eagle.train.metrics import device_peak_tflops
from longvl.eagle.train.parallel_dims import build_fsdp_mesh, build_stage_mesh, init_distributed
from longvl.eagle.train.stage import Stage
from longvl.eagle.train.trainer import (build_model, build_optimizer, check_tokenizer_fits, flops_model, prepare_model,
                                        train_step)
from longvl.parallel import ALGORITHMS

K = 1024


def synthetic_pack(length: int, tiles: int, model_config, seed: int):
    """One collated document of `length` tokens: `tiles` image blocks first, then supervised text."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = tiles * model_config.tokens_per_tile
    if image_tokens >= length:
        raise ValueError(f"{tiles} tiles ({image_tokens} tokens) do not fit in {length} tokens")
    vocab = model_config.text_config.vocab_size
    text = torch.randint(0, model_config.image_token_index, (length - image_tokens,), generator=generator)
    input_ids = torch.cat([torch.full((image_tokens,), model_config.image_token_index), text])
    labels = torch.where(input_ids == model_config.image_token_index, -100, input_ids).clamp(max=vocab - 1)
    size = model_config.force_image_size
    doc = {"input_ids": input_ids, "labels": labels, "num_tiles": [1] * tiles,
           "pixel_values": torch.randn(tiles, 3, size, size, generator=generator), "dataset": "bench", "id": "0"}
    return collate_pack(ProcessedPack([doc], [], {}, 0.0), image_token_id=model_config.image_token_index,
                        tokens_per_tile=model_config.tokens_per_tile, image_size=size)


class Bench:
    """Builds the sharded 8B model for one variant and times steps at given lengths.

    With `data_info` (real packs) the model takes the tokenizer's `<IMG_CONTEXT>` id: at 8B the built-in tiny
    tokenizer's, since no Qwen tokenizer is at hand; token ids do not change the cost of a step."""

    def __init__(self, args, *, kernels=True, offload=True, ac="full", data_info=None):
        overrides = [f"--kernels.enabled={str(kernels).lower()}",
                     f"--memory.offload_activations={str(offload).lower()}", f"--memory.activation_checkpointing={ac}",
                     "--stages=[{name: bench, max_length: 32768, steps: 1}]"]   # each run() sets its own stage
        self.config = load_config(args.preset, overrides + [f"--model.size={args.size}"])
        self.rank, self.world, self.device = init_distributed()
        self.fsdp_mesh = build_fsdp_mesh(self.world)
        with torch.device(self.device):   # built on the GPU: initialising 8B parameters on CPU takes minutes
            if data_info is None:
                model = build_model(self.config, vocab_size=1024, image_token_index=1023)  # tiny only
            else:
                model = build_model(self.config, data_info.vocab_size, data_info.image_token_index)
                model.config.image_token_index = data_info.image_token_index
                check_tokenizer_fits(model.config, data_info)
        self.model_config = model.config
        self.flops = flops_model(model)
        self.offload = prepare_model(self.config, model, self.device, self.fsdp_mesh)
        self.model = model
        self.optimizer = build_optimizer(self.config, model)
        self.args = args
        self.meshes = {}   # one set of process groups per (cp, ulysses) degree, not one per measurement

    def close(self):
        del self.model, self.optimizer
        gc.collect()
        if ON_GPU:
            torch.cuda.empty_cache()

    def run(self, length: int, cp: int, warmup: int | None = None, iters: int | None = None) -> dict:
        """Median step time etc. at `length` tokens per sequence with context parallelism `cp`; OOM -> None."""
        warmup = self.args.warmup if warmup is None else warmup
        iters = self.args.iters if iters is None else iters
        ulysses = 2 if self.args.cp_algorithm.startswith("hybrid") else 1
        stage = StageConfig(name=f"{length // K}K", max_length=length, cp=cp, steps=1, ulysses=ulysses,
                            cp_algorithm=self.args.cp_algorithm)
        if (cp, ulysses) not in self.meshes:
            self.meshes[cp, ulysses] = build_stage_mesh(self.fsdp_mesh, cp, ulysses)
        stage = Stage.build(stage, self.fsdp_mesh, self.model_config.text_config, mesh=self.meshes[cp, ulysses])
        batch = synthetic_pack(length, self.args.tiles, self.model_config, seed=stage.mesh.dp_rank)
        shard = stage.shard(batch, self.device)
        guard = NonFiniteGuard(10**9)
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats()
        times, oom = [], torch.zeros(1, device=self.device)
        try:
            for step in range(warmup + iters):
                start = time.perf_counter()
                if self.offload is not None:
                    self.offload.reset()
                train_step(self.model, self.optimizer, shard, stage, guard=guard, max_grad_norm=1.0,
                           step=step)   # ends with a host sync (grad norm)
                times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            oom += 1
        self.optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(oom)
        if oom.item():
            del shard
            gc.collect()
            torch.cuda.empty_cache()
            return None
        step_s = torch.tensor([statistics.median(times[warmup:])], device=self.device, dtype=torch.float64)
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else 0.0,
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        seconds = step_s.item()
        flops = self.flops.step_flops([length], self.args.tiles, self.args.tiles * self.model_config.tokens_per_tile)
        peak_tflops = device_peak_tflops()
        return {"step_ms": seconds * 1e3, "tokens_per_s_per_gpu": length / cp / seconds,
                "tflops_per_gpu": flops / cp / seconds / 1e12,
                "mfu": flops / cp / seconds / (peak_tflops * 1e12) if peak_tflops else None,
                "peak_gib": peak[0].item(), "peak_host_gib": peak[1].item()}


def record(records, ceilings, provider, length, cp, world, result, note=""):
    shape = {"tokens": length, "cp": cp, "world": world}
    if dist.get_rank() == 0:
        print(f"{note} {provider} tokens={length} cp={cp}: {result or 'OOM'}", flush=True)
    if result is None:
        records.append(Record(op="train_step", provider=provider, shape=shape, dtype="bfloat16",
                              median_ms=math.nan, device="gpu" if ON_GPU else "cpu", note=f"OOM {note}".strip()))
        return
    frac = result["tflops_per_gpu"] / ceilings["bf16_gemm_tflop_s"] if ceilings else None
    records.append(Record(op="train_step", provider=provider, shape=shape, dtype="bfloat16",
                          median_ms=result["step_ms"], metric="tokens/s/GPU", value=result["tokens_per_s_per_gpu"],
                          fraction_of_ceiling=frac, peak_extra_mib=result["peak_gib"] * 1024,
                          device="gpu" if ON_GPU else "cpu",
                          note=f"MFU {result['mfu'] or math.nan:.3f}, {result['tflops_per_gpu']:.2f} TFLOP/s/GPU "
                               f"(model FLOPs) {note}".strip()))


def search_max(bench, cp, start, limit, records, ceilings, provider):
    """Largest length (multiple of 8K) in [start, limit] that trains: double until OOM, then bisect.

    After an OOM the model is rebuilt: an exception inside an FSDP2 forward or backward can leave parameters
    unsharded. Returns (length or None, the bench to keep using)."""
    good, bad, length = None, None, start

    def attempt(n):
        nonlocal bench
        result = bench.run(n, cp, warmup=1, iters=1)   # fits or not: two steps (optimizer state included)
        record(records, ceilings, provider, n, cp, bench.world, result, "search")
        if result is None:
            bench.close()
            bench = Bench(bench.args)
        return result

    while length <= limit:
        if attempt(length) is None:
            bad = length
            break
        good, length = length, length * 2
    while good and bad and bad - good > 8 * K:
        middle = (good + bad) // 2 // (8 * K) * (8 * K)
        good, bad = (middle, bad) if attempt(middle) is not None else (good, middle)
    return good, bench


def data_share(args, world, records) -> dict:
    """Time each step as Trainer.run_stage does: t_data = next packed batch + its shard to the device.

    Ranks step together, so a rank waiting for data stalls all: a step's share is the slowest rank's t_data
    over the slowest rank's step time. The measured window can be shorter than what the workers prefetch,
    so `loader_load` adds the steady-state view: worker seconds per pack / (workers x step time), < 1 keeps up.
    """
    rank = dist.get_rank()
    folder = args.data_dir or os.path.join(tempfile.gettempdir(),
                                           f"longvl_bench_data_{args.data_samples}_{args.data_long_videos}")
    if rank == 0 and not os.path.isfile(os.path.join(folder, "mixture_video_heavy.yaml")):
        start = time.perf_counter()
        generate(folder, num=args.data_samples, seed=0, long_videos=args.data_long_videos)
        print(f"generated {folder} in {time.perf_counter() - start:.1f} s", flush=True)
    overrides = [f"--model.size={args.size}", "--data.source=mixture", f"--data.dir={folder}",
                 f"--data.index_workers={min(16, os.cpu_count())}",
                 f"--stages=[{{name: data, max_length: {args.data_length}, steps: 1}}]"]
    if args.data_workers is not None:
        overrides.append(f"--data.num_workers={args.data_workers}")
    config = load_config("eagle25-8b", overrides)
    info = dataclasses.replace(stage_data.prepare(config, rank),
                               mixture=os.path.join(folder, "mixture_video_heavy.yaml"))
    bench = Bench(args, kernels=ON_GPU, data_info=info)   # CPU: Triton's interpreter would take minutes a step
    stage_config = dataclasses.replace(config.stages[0], name=f"data-{args.data_length // K}K",
                                       max_length=args.data_length, cp=1, ulysses=1)
    stage = Stage.build(stage_config, bench.fsdp_mesh, bench.model_config.text_config)
    start = time.perf_counter()
    batches = iter(stage_data.StageLoader(config, info, bench.model_config, stage_config, stage.mesh.dp_rank,
                                          stage.mesh.dp))
    index_s = time.perf_counter() - start
    guard = NonFiniteGuard(10**9)
    slowest, totals = [], []
    for step in range(args.warmup + args.data_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        shard = stage.shard(batch, bench.device)
        t_data = time.perf_counter() - t0
        if bench.offload is not None:
            bench.offload.reset()
        train_step(bench.model, bench.optimizer, shard, stage, guard=guard, max_grad_norm=1.0,
                   step=step)   # ends with a host sync (grad norm)
        stats = batch.stats
        slowest.append([t_data, time.perf_counter() - t0, stats.worker_seconds])
        totals.append([stats.tokens, stats.frames, stats.tiles, stats.degraded, len(stats.bad_samples)])
    slowest = torch.tensor(slowest, dtype=torch.float64, device=bench.device)
    totals = torch.tensor(totals, dtype=torch.float64, device=bench.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    dist.all_reduce(totals)
    bench.close()
    t_data, step_s, worker_s = slowest[args.warmup:].T.tolist()
    tokens, frames, tiles, degraded, _ = totals[args.warmup:].T.tolist()
    shares = [d / s for d, s in zip(t_data, step_s)]
    workers = config.data.num_workers
    result = {"data_share_median": statistics.median(shares), "data_share_mean": statistics.mean(shares),
              "data_share_max": max(shares), "data_ms_median": statistics.median(t_data) * 1e3,
              "step_ms_median": statistics.median(step_s) * 1e3,
              "tokens_per_s_per_gpu": statistics.median(n / world / s for n, s in zip(tokens, step_s)),
              "worker_s_per_pack_median": statistics.median(worker_s),
              "loader_load": statistics.median(worker_s) / (max(workers, 1) * statistics.median(step_s)),
              "frames_per_pack": sum(frames) / len(frames) / world, "tiles_per_pack": sum(tiles) / len(tiles) / world,
              "degraded_docs": sum(degraded), "skipped_samples": int(totals[:, 4].sum()),
              "first_batch_s": slowest[0, 0].item(), "index_and_loader_s": index_s,
              "steps": args.data_steps, "warmup": args.warmup, "workers_per_rank": workers,
              "mixture": "synthetic mixture_video_heavy.yaml (65 % video draws), "
                         f"{args.data_samples} records, {args.data_long_videos} long 720p videos"}
    if rank == 0:
        print(f"data {stage.name}: {result}", flush=True)
    records.append(Record(op="train_data_share", provider="ours",
                          shape={"tokens": args.data_length, "cp": 1, "world": world, "workers": workers},
                          dtype="bfloat16", median_ms=result["step_ms_median"], metric="data share",
                          value=result["data_share_median"], device="gpu" if ON_GPU else "cpu",
                          note=repr(result)))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="max_dp,max_cp,ladder,pieces")
    parser.add_argument("--tiles", type=int, default=16, help="tiles per sequence (256 tokens each at 8B)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--cp-algorithm", default="auto")
    parser.add_argument("--pieces-length", type=int, default=32 * K)
    parser.add_argument("--max-dp-limit", type=int, default=256 * K, help="longest length the cp=1 search tries")
    parser.add_argument("--max-cp-start", type=int, default=128 * K, help="first length the cp=world search tries")
    parser.add_argument("--max-cp-limit", type=int, default=512 * K, help="longest length the cp=world search tries")
    parser.add_argument("--cp-length", type=int, default=128 * K, help="length of the cp_algorithms part (cp=world)")
    parser.add_argument("--name", default="train")
    parser.add_argument("--preset", default="eagle25-8b",
                        help="trainer preset whose memory settings the model gets (eagle25-8b-1gpu for longest_1gpu)")
    parser.add_argument("--longest-start", type=int, default=128 * K, help="first length longest_1gpu tries")
    parser.add_argument("--longest-limit", type=int, default=2048 * K, help="longest length longest_1gpu tries")
    parser.add_argument("--size", default="eagle25-8b", help="model size; `tiny` checks the script on CPU")
    parser.add_argument("--ladder", default="32768,65536,131072", help="lengths of the ladder part")
    parser.add_argument("--data-length", type=int, default=32 * K, help="max length of the data part's stage")
    parser.add_argument("--data-steps", type=int, default=8, help="measured steps of the data part")
    parser.add_argument("--data-workers", type=int, default=None, help="loader workers per rank (preset: 4)")
    parser.add_argument("--data-samples", type=int, default=256, help="records of the generated dataset")
    parser.add_argument("--data-long-videos", type=int, default=16, help="long 720p videos in the dataset")
    parser.add_argument("--data-dir", default=None, help="dataset folder (generated if it lacks the mixture)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    rank, world, _ = init_distributed()
    ceilings = device_ceilings() if rank == 0 else {}
    records, summary = [], {}
    bench = Bench(args) if {"max_dp", "max_cp", "ladder", "cp_algorithms", "pieces", "longest_1gpu"} & set(parts) else None
    if "max_dp" in parts:
        summary["max_tokens_per_gpu_cp1"], bench = search_max(bench, 1, 32 * K, args.max_dp_limit, records, ceilings,
                                                               "ours")
    if "max_cp" in parts:
        summary[f"max_tokens_cp{world}"], bench = search_max(bench, world, args.max_cp_start, args.max_cp_limit,
                                                             records, ceilings, "ours")
    if "ladder" in parts:
        for length in (int(n) for n in args.ladder.split(",")):
            cp = 1
            while cp <= world:
                result = bench.run(length, cp)
                record(records, ceilings, "ours", length, cp, world, result, "ladder")
                if result is None:
                    bench.close()
                    bench = Bench(args)
                else:
                    summary[f"tokens_per_s_per_gpu_at_{length}"] = result["tokens_per_s_per_gpu"]
                    summary[f"mfu_at_{length}"] = result["mfu"]
                    summary[f"cp_at_{length}"] = cp
                    break
                cp *= 2
    if "cp_algorithms" in parts:
        for algorithm in ALGORITHMS:   # the hybrids split cp into Ulysses 2 x ring or all-gather
            bench.args.cp_algorithm = algorithm
            record(records, ceilings, f"cp-{algorithm}", args.cp_length, world, world,
                   bench.run(args.cp_length, world), "cp algorithms")
        bench.args.cp_algorithm = args.cp_algorithm = "auto"
    if "pieces" in parts:
        record(records, ceilings, "ours", args.pieces_length, 1, world, bench.run(args.pieces_length, 1), "pieces")
    if "longest_1gpu" in parts:
        if world != 1:
            raise SystemExit("longest_1gpu measures one GPU: run it without torchrun or with --nproc-per-node 1")
        for tiles, provider in ((args.tiles, "eagle-1gpu"), (0, "text-only-1gpu")):
            bench.args.tiles = tiles
            summary[f"longest_{provider}"], bench = search_max(bench, 1, args.longest_start, args.longest_limit,
                                                                records, ceilings, provider)
        bench.args.tiles = args.tiles
    if bench is not None:
        bench.close()
    if "pieces" in parts:
        variants = [("kernels-off", dict(kernels=False)), ("offload-off", dict(offload=False)),
                    ("selective-ac", dict(ac="selective"))]
        for provider, options in variants:
            variant = Bench(args, **options)
            record(records, ceilings, provider, args.pieces_length, 1, world, variant.run(args.pieces_length, 1),
                   "pieces")
            variant.close()
    if "data" in parts:
        result = data_share(args, world, records)
        summary.update(data_share_median=result["data_share_median"], data_step_ms=result["step_ms_median"],
                       data_tokens_per_s_per_gpu=result["tokens_per_s_per_gpu"], data_loader_load=result["loader_load"])
    if rank == 0:
        records.append(Record(op="train_summary", provider="ours", shape={"world": world}, dtype="bfloat16",
                              median_ms=math.nan, device="gpu" if ON_GPU else "cpu", note=repr(summary)))
        path = save_results(records, ceilings, args.name)
        print(f"summary: {summary}" + (f"\nresults: {path}" if path else ""), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
