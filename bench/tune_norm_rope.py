"""Launch-setting sweep for the RMSNorm and RoPE kernels on the GPU present, the source of their tuned tables.

What it is for: `_FORWARD_CONFIGS` / `_BACKWARD_CONFIGS` (longvl/kernels/rms_norm.py) and `_num_warps` /
`_launch_config` (longvl/kernels/rope.py) hold launch settings picked from this sweep, and a setting tuned on one
card can lose on another (the H100 and the H200 disagree). Rerun it after changing either kernel, and on each
card the tables should serve; past sweeps are kept in bench/results/tuning/.

How: `python -m bench.tune_norm_rope --out DIR [--only norm|rope] [--norm-shapes 4096x3584,16384x1152]` on a
machine with a CUDA GPU. Every candidate is graph-timed (CUDA-graph replay, median), checked against the
default setting's result, and reported as a fraction of the 1 GiB copy ceiling and of a same-size SM copy
measured in the same run; a summary per shape is printed and everything lands in DIR/tune_norm_rope.json.
"""
import argparse
import functools
import importlib
import itertools
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import triton.testing

from bench.harness import copy_of, device_ceilings, environment
from longvl.kernels._utils import multiprocessor_count, next_power_of_2

norm_mod = importlib.import_module("longvl.kernels.rms_norm")
rope_mod = importlib.import_module("longvl.kernels.rope")
DTYPE = torch.bfloat16
NORM_SHAPES = "4096x3584,16384x1152,16384x3584,16384x4608,65536x3584"
ROPE_TOKENS = [4096, 16384, 65536]
ROPE_HEADS, HEAD_DIM = (28, 4), 128


def graph_ms(fn):
    return float(triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median"))


def copy_ms(nbytes):
    return graph_ms(copy_of(nbytes, "cuda"))


def _close(a, b):
    """Same result up to bf16 rounding (launch settings change the order of a row's reductions)."""
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2))


def _norm_fwd_bwd(x, w, dy):
    def run():
        x_leaf, w_leaf = x.detach().requires_grad_(), w.detach().requires_grad_()
        return torch.autograd.grad(norm_mod.rms_norm(x_leaf, w_leaf), (x_leaf, w_leaf), dy)
    return run


def tune_norm(ceiling, results, shapes):
    sms = multiprocessor_count(0)
    for tokens, hidden in shapes:
        x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE)
        dy = torch.randn_like(x)
        w = (torch.rand(hidden, device="cuda") + 0.5).to(DTYPE)
        nbytes = {"fwd": (2 * tokens * hidden + hidden) * 2, "bwd": (3 * tokens * hidden + 2 * hidden) * 2,
                  "fwd_bwd": (5 * tokens * hidden + 3 * hidden) * 2}
        floors = {op: copy_ms(b) for op, b in nbytes.items()}
        y_ref, _, rstd = norm_mod._forward(x, w, None, 1e-6, 0.0, "llama", store_rstd=True)
        dx_ref, dw_ref = norm_mod._backward(dy, x, w, rstd, None, 0.0, "llama")
        block, tail = norm_mod._pieces(hidden)
        width = next_power_of_2(block + tail)
        entry = {"tokens": tokens, "hidden": hidden, "copy_floor_ms": floors, "default": {}, "fwd": [], "bwd": []}

        def rate(op, ms):
            return {"ms": ms, "of_ceiling": nbytes[op] / ms / 1e9 / ceiling, "of_copy": floors[op] / ms}

        entry["default"]["fwd"] = rate("fwd", graph_ms(lambda: norm_mod.rms_norm(x, w)))
        entry["default"]["fwd_bwd"] = rate("fwd_bwd", graph_ms(_norm_fwd_bwd(x, w, dy)))
        entry["default"]["bwd"] = rate("bwd", graph_ms(lambda: norm_mod._backward(dy, x, w, rstd, None, 0.0, "llama")))
        for rows, warps in itertools.product([1, 2, 4, 8], [1, 2, 4, 8, 16]):
            if rows * width > 16384 or warps * 32 * 4 > rows * width:
                continue
            with mock.patch.object(norm_mod, "_forward_config", lambda n, c=(block, tail, rows, warps): c):
                y = norm_mod.rms_norm(x, w)
                ok = _close(y, y_ref)
                entry["fwd"].append({"rows": rows, "warps": warps, "ok": ok,
                                     **rate("fwd", graph_ms(lambda: norm_mod.rms_norm(x, w)))})
        for rows, warps, per_sm, atomic in itertools.product([1, 2, 4, 8, 16], [4, 8, 16, 32], [1, 2, 3, 4],
                                                             [True, False]):
            if rows * (block + tail) > 18432 or warps * 32 * 2 > rows * width or (rows * width > 8192 and per_sm > 1):
                continue
            config = functools.partial(lambda *args, c: c, c=(block, tail, rows, warps, per_sm * sms))
            with mock.patch.object(norm_mod, "_backward_config", config), \
                    mock.patch.object(norm_mod, "_atomic_dw", lambda a=atomic: a):
                dx, dw = norm_mod._backward(dy, x, w, rstd, None, 0.0, "llama")
                ok = _close(dx, dx_ref) and _close(dw, dw_ref)
                ms = graph_ms(lambda: norm_mod._backward(dy, x, w, rstd, None, 0.0, "llama"))
                entry["bwd"].append({"rows": rows, "warps": warps, "per_sm": per_sm, "atomic": atomic,
                                     "ok": ok,
                                     **rate("bwd", ms)})
        best_f = max((r for r in entry["fwd"] if r["ok"]), key=lambda r: r["of_ceiling"])
        best_b = max((r for r in entry["bwd"] if r["ok"]), key=lambda r: r["of_ceiling"])
        print(f"rms_norm {tokens}x{hidden}: copy floors {floors}")
        print(f"  default fwd {entry['default']['fwd']}  bwd {entry['default']['bwd']}  "
              f"fwd_bwd {entry['default']['fwd_bwd']}")
        print(f"  best fwd {best_f}")
        print(f"  best bwd {best_b}")
        for atomic in (True, False):
            top = sorted((r for r in entry["bwd"] if r["ok"] and r["atomic"] == atomic), key=lambda r: r["ms"])[:4]
            print(f"  top bwd atomic={atomic}: " + "; ".join(
                f"r{r['rows']} w{r['warps']} p{r['per_sm']} {r['ms']*1e3:.1f}us {r['of_ceiling']:.3f} "
                f"({r['of_copy']:.3f})" for r in top))
        bad = [r for r in entry["fwd"] + entry["bwd"] if not r["ok"]]
        if bad:
            print(f"  MISMATCH in {len(bad)} configs: {bad[:3]}")
        results["rms_norm"].append(entry)


def _rope_inputs(tokens):
    q = torch.randn(1, tokens, ROPE_HEADS[0], HEAD_DIM, device="cuda", dtype=DTYPE).transpose(1, 2)
    k = torch.randn(1, tokens, ROPE_HEADS[1], HEAD_DIM, device="cuda", dtype=DTYPE).transpose(1, 2)
    pos = torch.arange(tokens, device="cuda")[None]
    inv = rope_mod._inv_freq(1e6, HEAD_DIM, q.device)
    angle = torch.cat([pos[0, :, None].float() * inv] * 2, dim=-1)
    return q, k, angle.cos().to(DTYPE)[None], angle.sin().to(DTYPE)[None]


def tune_rope(ceiling, results):
    base = rope_mod._launch_config
    for tokens in ROPE_TOKENS:
        q, k, cos, sin = _rope_inputs(tokens)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        elems = (ROPE_HEADS[0] + ROPE_HEADS[1]) * tokens * HEAD_DIM
        nbytes = {"fwd": 2 * elems * 2, "fwd_bwd": 4 * elems * 2}
        floors = {op: copy_ms(b) for op, b in nbytes.items()}

        def fwd():
            return rope_mod.apply_rope(q, k, cos, sin)

        def fwd_bwd():
            q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
            return torch.autograd.grad(rope_mod.apply_rope(q_leaf, k_leaf, cos, sin), (q_leaf, k_leaf), (dq, dk))

        ref = fwd() + fwd_bwd()
        entry = {"tokens": tokens, "copy_floor_ms": floors, "configs": []}
        for warps, split in itertools.product([1, 2, 4, 8], [1, 2, 4]):
            def config(*args, nw=warps, parts=split):
                constants, blocks = base(*args)
                heads = dict(BLOCK_Q_HEADS=constants["BLOCK_Q_HEADS"] // parts,
                             BLOCK_K_HEADS=max(1, constants["BLOCK_K_HEADS"] // parts))
                return dict(constants, num_warps=nw, **heads), blocks * parts
            with mock.patch.object(rope_mod, "_launch_config", config):
                ok = all(torch.equal(a, b) for a, b in zip(fwd() + fwd_bwd(), ref))
                row = {"warps": warps, "head_split": split, "ok": ok}
                for op, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                    ms = graph_ms(fn)
                    row[op] = {"ms": ms, "of_ceiling": nbytes[op] / ms / 1e9 / ceiling, "of_copy": floors[op] / ms}
                entry["configs"].append(row)
        print(f"rope {tokens}: copy floors {floors}")
        for op in ("fwd", "fwd_bwd"):
            top = sorted((r for r in entry["configs"] if r["ok"]), key=lambda r: -r[op]["of_ceiling"])[:4]
            print(f"  top {op}: " + "; ".join(f"w{r['warps']} s{r['head_split']} "
                                             f"{r[op]['ms']*1e3:.1f}us "
                                             f"{r[op]['of_ceiling']:.3f} ({r[op]['of_copy']:.3f})" for r in top))
        bad = [r for r in entry["configs"] if not r["ok"]]
        if bad:
            print(f"  MISMATCH in {len(bad)} configs: {bad[:3]}")
        results["rope"].append(entry)


def _shapes(text):
    try:
        return [tuple(int(n) for n in shape.split("x", 1)) for shape in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKENSxHIDDEN[,TOKENSxHIDDEN...], got {text!r}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.tune_norm_rope",
                                     description="Sweep the RMSNorm and RoPE launch settings on this GPU.")
    parser.add_argument("--out", type=Path, required=True, help="directory for tune_norm_rope.json (created)")
    parser.add_argument("--only", choices=("norm", "rope"), help="sweep one kernel (default: both)")
    parser.add_argument("--norm-shapes", type=_shapes, default=_shapes(NORM_SHAPES), metavar="TxH,...",
                        help=f"RMSNorm shapes, tokens x hidden (default {NORM_SHAPES})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the sweep times kernels by CUDA-graph replay")
    ceilings = device_ceilings()
    print(ceilings)
    results = {"env": environment(), "ceilings": ceilings, "rms_norm": [], "rope": []}
    if args.only in (None, "rope"):
        tune_rope(ceilings["copy_tb_s"], results)
    if args.only in (None, "norm"):
        tune_norm(ceilings["copy_tb_s"], results, args.norm_shapes)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "tune_norm_rope.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
