"""Can a Triton GEMM carry the SwiGLU epilogue at cuBLAS speed here? `python -m bench.probe_gemm_epilogue`

The fused MLP only beats eager by more than its elementwise savings if the gate / up GEMM with SwiGLU in its
epilogue runs at cuBLAS speed. This times, at Qwen2.5-7B's MLP (16K tokens, 3584 -> 18944, bf16): cuBLAS alone,
cuBLAS gate + up GEMMs plus our elementwise kernel, our pointer-based Triton GEMM (swiglu_mlp(fused_gemm=True)),
and persistent TMA Triton GEMMs (with and without Hopper warp specialisation) of one and of both weights, the
latter with the SwiGLU epilogue. Each output is checked against cuBLAS. Writes probe_gemm_epilogue.json to
$OUT (or cwd); past runs: bench/results/tuning/.
"""
import importlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from bench.harness import device_ceilings, environment

swiglu_mod = importlib.import_module("longvl.kernels.swiglu")
TOKENS, HIDDEN, INTERMEDIATE = 16384, 3584, 18944
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, warp_specialize, flatten)
CONFIGS = [(128, 256, 64, 3, 8, False, True), (128, 128, 64, 4, 8, False, True), (128, 128, 64, 4, 8, False, False),
           (128, 128, 64, 3, 8, True, False), (128, 128, 64, 4, 8, True, False)]


@triton.jit
def _persistent_tma_gemm(a_desc, gate_desc, up_desc, h_desc, gate_out_desc, up_out_desc, M, N, K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
                         SWIGLU: tl.constexpr):
    """a @ gate^T (SWIGLU=False), or h = silu(a @ gate^T) * (a @ up^T) also storing both products."""
    n_pid_m, n_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_pid_m * n_pid_n, NUM_SMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        group = tile // (8 * n_pid_n)  # 8 row tiles walk the columns together: a tiles stay in L2
        rows_in_group = min(n_pid_m - group * 8, 8)
        row = (group * 8 + (tile % (8 * n_pid_n)) % rows_in_group) * BLOCK_M
        col = ((tile % (8 * n_pid_n)) // rows_in_group) * BLOCK_N
        gate_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        up_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, K, BLOCK_K):
            a = a_desc.load([row, k])
            gate_acc = tl.dot(a, gate_desc.load([col, k]).T, gate_acc)
            if SWIGLU:
                up_acc = tl.dot(a, up_desc.load([col, k]).T, up_acc)
        gate = gate_acc.to(tl.bfloat16)
        if SWIGLU:
            up = up_acc.to(tl.bfloat16)
            gate_f = gate.to(tl.float32)
            h_desc.store([row, col], (gate_f * tl.sigmoid(gate_f) * up.to(tl.float32)).to(tl.bfloat16))
            gate_out_desc.store([row, col], gate)
            up_out_desc.store([row, col], up)
        else:
            h_desc.store([row, col], gate)


def tma_gemm(x, gate_w, up_w, config, swiglu):
    block_m, block_n, block_k, stages, warps, warp_specialize, flatten = config
    h = torch.empty(x.shape[0], gate_w.shape[0], device=x.device, dtype=x.dtype)
    gate, up = (torch.empty_like(h), torch.empty_like(h)) if swiglu else (h, h)
    descs = [TensorDescriptor.from_tensor(t, [block_m, block_k]) for t in (x,)]
    descs += [TensorDescriptor.from_tensor(t, [block_n, block_k]) for t in (gate_w, up_w)]
    descs += [TensorDescriptor.from_tensor(t, [block_m, block_n]) for t in (h, gate, up)]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    tiles = triton.cdiv(h.shape[0], block_m) * triton.cdiv(h.shape[1], block_n)
    _persistent_tma_gemm[(min(sms, tiles),)](
        *descs, h.shape[0], h.shape[1], x.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        NUM_SMS=sms, WARP_SPECIALIZE=warp_specialize, FLATTEN=flatten, SWIGLU=swiglu, num_stages=stages,
        num_warps=warps)
    return h, gate, up


def main():
    torch.manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    gate_w, up_w = (torch.randn(INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN**0.5
                    for _ in range(2))
    gemm_tflop = 2 * TOKENS * HIDDEN * INTERMEDIATE / 1e12
    gate_ref, up_ref = F.linear(x, gate_w), F.linear(x, up_w)
    h_ref = swiglu_mod.swiglu_forward(gate_ref, up_ref)
    timed = lambda fn: float(do_bench(fn, warmup=5, rep=300, return_mode="median"))
    records = [dict(name="cublas_gemm", gemms=1, ms=timed(lambda: F.linear(x, gate_w))),
               dict(name="cublas_gate_up_plus_swiglu_kernel", gemms=2,
                    ms=timed(lambda: swiglu_mod.swiglu_forward(F.linear(x, gate_w), F.linear(x, up_w)))),
               dict(name="triton_pointer_swiglu_epilogue", gemms=2,
                    ms=timed(lambda: swiglu_mod.gate_up_swiglu_gemm(x, gate_w, up_w, None, None, True)))]
    for config in CONFIGS:
        for swiglu in (False, True):
            name = f"triton_tma_{'swiglu_epilogue' if swiglu else 'gemm'}"
            record = dict(name=name, gemms=2 if swiglu else 1, config=dict(zip(
                ("block_m", "block_n", "block_k", "stages", "warps", "warp_specialize", "flatten"), config)))
            try:
                h, gate, up = tma_gemm(x, gate_w, up_w, config, swiglu)
                pairs = [(h, h_ref), (gate, gate_ref), (up, up_ref)] if swiglu else [(h, gate_ref)]
                record["max_abs_error"] = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
                record["ms"] = timed(lambda: tma_gemm(x, gate_w, up_w, config, swiglu))
            except triton.runtime.errors.OutOfResources as error:  # e.g. two 128x256 tiles of shared memory
                record["error"] = str(error)
            records.append(record)
    cublas_ms = records[0]["ms"]
    for record in records:
        if "ms" in record:
            record["tflop_s"] = record["gemms"] * gemm_tflop / record["ms"] * 1e3
            record["vs_cublas_per_gemm"] = record["ms"] / record["gemms"] / cublas_ms
        print(json.dumps(record))
    result = dict(env=environment(), ceilings=device_ceilings(),
                  shape=dict(tokens=TOKENS, hidden=HIDDEN, intermediate=INTERMEDIATE, dtype="bfloat16"),
                  records=records)
    out = Path(os.environ.get("OUT", ".")) / "probe_gemm_epilogue.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
