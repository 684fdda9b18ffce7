"""Context-parallel attention benchmark (a torchrun script, not a pytest file).

    torchrun --nproc-per-node 4 bench/bench_cp.py        # every algorithm vs torch's CP and one GPU
    python bench/bench_cp.py --probe                      # one GPU: each aten backend, dense and ragged

Shape: Qwen2.5-7B attention (28 query heads, 4 KV heads, head dim 128), bf16, causal, fwd+bwd. Times are
CUDA-event medians after warm-up, the max over ranks. FLOP convention: causal forward = 4 * S^2 * H * D / 2
(S the whole sequence, or the sum over documents of length^2 for packed batches), backward = 2.5 x forward,
so fwd+bwd = 3.5 x forward; value = TFLOP/s per GPU = that / world size / time. `note` gives the ratio to
single-GPU cuDNN at the same tokens per GPU, measured by rank 0 alone in the same run.
"""
import argparse
import datetime
import os
import random
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from bench.harness import Record, device_ceilings, save_results
from longvl.parallel import ALGORITHMS, context_parallel_attention, gather, init_cp_mesh, plan_for, shard
from longvl.parallel.block_attention import attention_backward, attention_forward

Q_HEADS, KV_HEADS, DIM = 28, 4, 128
OP = "cp_attention.fwd_bwd"


def causal_flops(lengths, q_heads=Q_HEADS, dim=DIM):
    return sum(3.5 * 4 * n * n * q_heads * dim / 2 for n in lengths)


def time_ms(fn, warmup, iters):
    """Median CUDA-event time of fn() in ms on this rank (events bracket each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def max_over_ranks(value):
    t = torch.tensor([value], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def iters_for(tokens):
    return (3, 10) if tokens <= 16384 else (2, 5)


def single_gpu_cudnn(tokens):
    """Single-GPU cuDNN SDPA (KV repeated outside the timing): the denominator of every ratio."""
    q = torch.randn(1, Q_HEADS, tokens, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, Q_HEADS, tokens, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    dout = torch.randn_like(q)

    def step():
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)
    return time_ms(step, *iters_for(tokens))


def cp_inputs(plan, rank, total):
    torch.manual_seed(0)
    q = torch.randn(1, total, Q_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, total, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16).unbind(0)
    local = [shard(x, plan, rank).requires_grad_() for x in (q, k, v)]
    return local, torch.randn_like(local[0])


def run_algorithm(algorithm, groups, lengths, rank, backend="auto", iters=None):
    plan = plan_for(lengths, groups, algorithm)
    (q, k, v), dout = cp_inputs(plan, rank, sum(lengths))

    def step():
        context_parallel_attention(q, k, v, groups=groups, plan=plan, algorithm=algorithm,
                                   backend=backend).backward(dout)
    return max_over_ranks(time_ms(step, *(iters or iters_for(q.shape[1]))))


def run_torch_cp(mesh, world, tokens, rotate):
    """torch.distributed.tensor.experimental.context_parallel, cuDNN SDPA, KV repeated to 28 heads."""
    from torch.distributed.tensor.experimental import context_parallel
    try:
        from torch.distributed.tensor.experimental._context_parallel import set_rotate_method
    except ImportError:
        from torch.distributed.tensor.experimental._attention import set_rotate_method

    set_rotate_method(rotate)
    total = tokens * world
    q, k, v, dout = (torch.randn(1, Q_HEADS, total, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    with context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2]):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def step():
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
                F.scaled_dot_product_attention(*leaves, is_causal=True).backward(dout)
        return max_over_ranks(time_ms(step, *iters_for(tokens)))


def check_algorithm(algorithm, groups, lengths, rank):
    """Max abs error (out, dq, dk, dv) of bf16 CP attention against single-GPU fp32 reference attention."""
    plan = plan_for(lengths, groups, algorithm)
    total = sum(lengths)
    torch.manual_seed(1)
    q, dout = torch.randn(2, 1, total, Q_HEADS, DIM, device="cuda", dtype=torch.bfloat16).unbind(0)
    k, v = torch.randn(2, 1, total, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16).unbind(0)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32) if len(lengths) > 1 else None
    out_ref, lse_ref, aux = attention_forward(q.float(), k.float(), v.float(), causal=True, cu_seqlens_q=cu,
                                              cu_seqlens_k=cu, backend="reference")
    refs = (out_ref,) + attention_backward(dout.float(), q.float(), k.float(), v.float(), out_ref, lse_ref, aux,
                                           causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    local = [shard(x, plan, rank).requires_grad_() for x in (q, k, v)]
    out = context_parallel_attention(*local, groups=groups, plan=plan, algorithm=algorithm)
    grads = torch.autograd.grad(out, local, shard(dout, plan, rank))
    return max((gather(got.detach(), plan, groups.cp).float() - want).abs().max().item()
               for got, want in zip((out,) + grads, refs))


def random_documents(total, rng, shortest=512, longest=32768):
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(shortest, longest), total - sum(lengths)))
    return lengths


def main_distributed(args):
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    ulysses = 2 if world >= 4 else 1
    _, groups = init_cp_mesh("cuda", cp_size=world, ulysses_size=ulysses)
    torch_mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp_torch",))  # for torch's CP
    algorithms = [a for a in ALGORITHMS if not (a.startswith("hybrid") and ulysses == 1)]
    records, ceilings = [], (device_ceilings() if rank == 0 else {})
    shape = lambda tokens, **extra: dict(world_size=world, tokens_per_gpu=tokens, q_heads=Q_HEADS,
                                         kv_heads=KV_HEADS, head_dim=DIM, ulysses=ulysses, **extra)

    def record(provider, tokens, ms, flops, base, **extra):
        value = flops / world / ms / 1e9
        note = f"ratio vs single-GPU cuDNN {value / base:.3f}" if base else ""
        records.append(Record(OP, provider, shape(tokens, **extra), "bfloat16", ms, "TFLOP/s", value,
                              device="gpu", note=note))
        if rank == 0:
            print(f"W={world} {provider:18s} tokens/GPU={tokens:7d} {extra} {ms:9.2f} ms {value:7.1f} TFLOP/s "
                  f"{note}", flush=True)

    def attempt(label, fn):
        """fn(), or None after reporting its error: one failing provider must not end the run."""
        try:
            return fn()
        except Exception as exc:
            if rank == 0:
                print(f"{label} failed: {exc!r}"[:600], flush=True)
            return None

    for algorithm in algorithms:  # bf16 correctness at a small size before any timing
        err = attempt(f"check {algorithm}", lambda: check_algorithm(algorithm, groups, [1024 * world], rank))
        err_packed = attempt(f"check packed {algorithm}",
                             lambda: check_algorithm(algorithm, groups, [37, 600, 5, 1000, 3], rank))
        if err is None or err_packed is None:
            continue
        records.append(Record("cp_attention.max_abs_error", algorithm, shape(1024, packed_error=err_packed),
                              "bfloat16", 0.0, "abs error", err, device="gpu", note="vs fp32 reference, dense"))
        if rank == 0:
            print(f"W={world} {algorithm}: max abs error dense {err:.3e}, packed {err_packed:.3e}", flush=True)

    for tokens in args.tokens:
        base_ms = single_gpu_cudnn(tokens) if rank == 0 else 0.0
        dist.barrier()
        base = causal_flops([tokens]) / base_ms / 1e9 if rank == 0 else 0.0
        base = max_over_ranks(base)
        record("single_gpu_cudnn", tokens, max_over_ranks(base_ms), causal_flops([tokens]) * world, base)
        for algorithm in algorithms:
            ms = attempt(algorithm, lambda: run_algorithm(algorithm, groups, [tokens * world], rank))
            if ms is not None:
                record(algorithm, tokens, ms, causal_flops([tokens * world]), base)
        for rotate in ("allgather", "alltoall"):
            ms = attempt(f"torch_cp {rotate}", lambda: run_torch_cp(torch_mesh, world, tokens, rotate))
            if ms is not None:
                record(f"torch_cp_{rotate}", tokens, ms, causal_flops([tokens * world]), base)
        if tokens == args.packed_tokens:
            lengths = random_documents(tokens * world, random.Random(0))
            for algorithm in algorithms:
                for backend in ("cudnn", "flash"):
                    ms = attempt(f"packed {algorithm} {backend}",
                                 lambda: run_algorithm(algorithm, groups, lengths, rank, backend))
                    if ms is not None:
                        record(f"{algorithm}[{backend}]", tokens, ms, causal_flops(lengths), base,
                               packed_docs=len(lengths), doc_lengths=lengths)

    if world == args.max_seq_world:
        for tokens in args.max_seq_tokens:
            try:
                torch.cuda.reset_peak_memory_stats()
                ms = run_algorithm(args.max_seq_algorithm, groups, [tokens * world], rank, iters=(1, 1))
                peak = max_over_ranks(torch.cuda.max_memory_allocated() / 2**30)
                record(f"{args.max_seq_algorithm}_max_seq", tokens, ms, causal_flops([tokens * world]), 0.0,
                       peak_gib=round(peak, 2))
            except torch.OutOfMemoryError:
                if rank == 0:
                    print(f"OOM at {tokens} tokens per GPU", flush=True)
                break
    if rank == 0:
        path = save_results(records, ceilings, f"cp_attention_w{world}", out_dir=os.environ.get("OUT"))
        print(f"results: {path}", flush=True)
    dist.destroy_process_group()


def main_probe(args):
    """One GPU: which aten attention ops exist and how fast each backend is, dense and ragged."""
    ops = ["_scaled_dot_product_cudnn_attention", "_cudnn_attention_forward", "_flash_attention_forward",
           "_efficient_attention_forward", "_scaled_dot_product_flash_attention"]
    print("torch", torch.__version__, {op: hasattr(torch.ops.aten, op) for op in ops}, flush=True)
    try:
        import torch.nn.attention.varlen as varlen_module
        print("torch.nn.attention.varlen:", [n for n in dir(varlen_module) if not n.startswith("__")], flush=True)
    except ImportError as exc:
        print("no torch.nn.attention.varlen:", exc, flush=True)
    records = []
    for backend in ("cudnn", "flash", "efficient"):
        for tokens in args.tokens:
            for varlen in (False, True):
                lengths = random_documents(tokens, random.Random(0)) if varlen else [tokens]
                q = torch.randn(1, tokens, Q_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
                k, v = torch.randn(2, 1, tokens, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16).unbind(0)
                cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32) if varlen else None
                kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths)) \
                    if varlen else {}

                def step():
                    out, lse, aux = attention_forward(q, k, v, causal=True, backend=backend, **kw)
                    attention_backward(q, q, k, v, out, lse, aux, causal=True, **kw)
                try:
                    ms = time_ms(step, 3, 10)
                except Exception as exc:
                    print(f"{backend} varlen={varlen} tokens={tokens}: FAILED {exc!r}"[:300], flush=True)
                    continue
                value = causal_flops(lengths) / ms / 1e9
                print(f"{backend:9s} varlen={varlen!s:5s} tokens={tokens:6d} {ms:8.2f} ms {value:6.1f} TFLOP/s",
                      flush=True)
                records.append(Record("attention.fwd_bwd", backend, dict(tokens=tokens, varlen=varlen, docs=len(lengths)),
                                      "bfloat16", ms, "TFLOP/s", value, device="gpu"))
    # Real packs change their document lengths every step, and cuDNN builds an execution plan per new length:
    # packs of short documents drawn afresh for every call show what that costs against flash's one varlen call.
    for backend in ("cudnn", "flash"):
        for tokens in args.tokens:
            rng = random.Random(1)
            q = torch.randn(1, tokens, Q_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
            k, v = torch.randn(2, 1, tokens, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16).unbind(0)
            drawn = []

            def fresh_step():
                lengths = random_documents(tokens, rng, shortest=64, longest=args.fresh_longest)
                drawn.append(lengths)
                cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
                kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths),
                          seqlens_q=lengths, seqlens_k=lengths)
                out, lse, aux = attention_forward(q, k, v, causal=True, backend=backend, **kw)
                attention_backward(q, q, k, v, out, lse, aux, causal=True, **kw)
            ms = time_ms(fresh_step, 3, 10)
            docs = statistics.median(len(lengths) for lengths in drawn)
            value = statistics.median(causal_flops(lengths) for lengths in drawn) / ms / 1e9
            print(f"{backend:9s} fresh packs 64-{args.fresh_longest} tokens={tokens:6d} ({docs:.0f} docs) {ms:8.2f} ms "
                  f"{value:6.1f} TFLOP/s", flush=True)
            records.append(Record("attention.fwd_bwd", backend, dict(tokens=tokens, varlen=True, docs=docs,
                                                                     lengths=f"fresh 64-{args.fresh_longest}"),
                                  "bfloat16", ms, "TFLOP/s", value, device="gpu"))
    for tokens in args.tokens:
        ms = single_gpu_cudnn(tokens)
        records.append(Record("attention.fwd_bwd", "sdpa_cudnn_repeated_kv", dict(tokens=tokens), "bfloat16", ms,
                              "TFLOP/s", causal_flops([tokens]) / ms / 1e9, device="gpu"))
        print(f"sdpa cuDNN (KV repeated) tokens={tokens} {ms:.2f} ms {records[-1].value:.1f} TFLOP/s", flush=True)
    print("path:", save_results(records, device_ceilings(), "attention_backends", out_dir=os.environ.get("OUT")))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="single-GPU backend probe instead of the CP run")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="tokens per GPU")
    parser.add_argument("--packed-tokens", type=int, default=32768)
    parser.add_argument("--fresh-longest", type=int, default=4096,
                        help="probe: longest document of the packs drawn afresh for every call")
    parser.add_argument("--max-seq-world", type=int, default=4)
    parser.add_argument("--max-seq-algorithm", default="ring")
    parser.add_argument("--max-seq-tokens", type=int, nargs="+", default=[131072, 262144])
    cli = parser.parse_args()
    main_probe(cli) if cli.probe else main_distributed(cli)
