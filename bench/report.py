"""Render the performance report from the committed results JSON: README table, REPORT.md and PNG plots.

    python -m bench.report            # rewrite README's table, bench/REPORT.md, bench/results/plots/*.png

Only GPU records are tabled (CPU-side ones, like the processor's, stay in their JSON). For each (op, shape,
dtype) our fastest variant is compared with the fastest peer of the same run (the README keeps the newest run
per card, bench/REPORT.md every run); context-parallel rows also give per-GPU throughput as a fraction of one
GPU alone. Every figure comes from a results file, none is typed.
"""
import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
# The README shows these ops; bench/REPORT.md shows every op (variants, host-included timings, GEMM studies).
README_OPS = ("rms_norm.fwd", "rms_norm.fwd_bwd", "rope.fwd", "rope.fwd_bwd", "swiglu.fwd_bwd", "swiglu_mlp.fwd_bwd",
              "linear_cross_entropy.fwd_bwd", "hf_train_step.qwen2_7b", "cp_attention.fwd_bwd", "train_step")


def load_runs():
    runs = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("env", {}).get("device", "cpu") != "cpu":
            data["file"] = path.name
            runs.append(data)
    return runs


def _shape_str(shape):
    return " ".join(f"{k}={v}" for k, v in shape.items())


CP_ALGORITHMS = ("ring", "allgather", "ulysses", "hybrid_ring", "hybrid_allgather")


# bench_train's settings of our trainer: context-parallel algorithm choices and the pieces switched off or swapped.
TRAIN_VARIANTS = ("kernels-off", "offload-off", "selective-ac")


def is_ours(provider: str) -> bool:
    """Our kernels are `ours` or `ours.<variant>`; our context-parallel algorithms go by their names, and the
    trainer's variants by `cp-<algorithm>` or TRAIN_VARIANTS."""
    return (provider.startswith(("ours", "cp-")) or provider in TRAIN_VARIANTS
            or provider.split("[")[0] in CP_ALGORITHMS)


def comparisons(runs):
    """Rows of (run, op, shape, dtype, {provider: record}) for every timed group of records."""
    rows = []
    for run in runs:
        groups = defaultdict(dict)
        for rec in run["records"]:
            if rec["median_ms"] > 0 and rec.get("device") == "gpu":  # CPU-side benches are reported apart
                groups[(rec["op"], _shape_str(rec["shape"]), rec["dtype"])][rec["provider"]] = rec
        rows += [(run, *key, provs) for key, provs in groups.items()]
    return rows


def newest_per_card(rows):
    """One row per (card, op, shape, dtype): the one from the newest run (the README's table; bench/REPORT.md keeps
    every run)."""
    newest = {}
    for row in rows:
        env = row[0]["env"]
        key = (env.get("device"), *row[1:4])
        if key not in newest or env.get("date", "") > newest[key][0]["env"].get("date", ""):
            newest[key] = row
    return list(newest.values())


def _speed(rec):
    """Higher is faster: the achieved rate when there is one (per GPU for CP), else 1 / time."""
    return rec["value"] if rec.get("value") else 1.0 / rec["median_ms"]


def _fmt_rec(name, rec):
    text = f"{name}: {rec['median_ms']:.3f} ms"
    if rec.get("value") is not None:
        text += f", {rec['value']:.2f} {rec['metric']}"
    if rec.get("peak_extra_mib") is not None:
        text += f", {rec['peak_extra_mib']:.0f} MiB"
    for name, error in (rec.get("rel_error") or {}).items():
        text += f", {name} error {error:.1e}"
    return text


def table(rows):
    lines = ["| op | shape | dtype | ours (best variant) | best peer | speed-up | run |",
             "|---|---|---|---|---|---|---|"]
    for run, op, shape, dtype, provs in rows:
        ours = {p: r for p, r in provs.items() if is_ours(p)}
        peers = {p: r for p, r in provs.items()  # references (one GPU, a GEMM floor) are not peers
                 if not is_ours(p) and not p.startswith("single_gpu") and "floor" not in p}
        if not ours:
            continue
        best_name, best = max(ours.items(), key=lambda kv: _speed(kv[1]))
        ours_txt = _fmt_rec(best_name, best)
        if "single_gpu_cudnn" in provs:  # context parallelism: per-GPU throughput against one GPU alone
            ours_txt += f" = {_speed(best) / _speed(provs['single_gpu_cudnn']):.2f} of 1-GPU cuDNN"
        if best.get("metric") == "TB/s" and best.get("fraction_of_ceiling"):
            ours_txt += f" = {best['fraction_of_ceiling']:.2f} of copy ceiling"
            if "copy_floor" in provs:
                ours_txt += f", {_speed(best) / _speed(provs['copy_floor']):.2f} of a same-size copy"
        if peers:
            peer_name, peer = max(peers.items(), key=lambda kv: _speed(kv[1]))
            peer_txt, speedup = _fmt_rec(peer_name, peer), f"{_speed(best) / _speed(peer):.2f}x"
        else:
            peer_txt, speedup = "-", "-"
        lines.append(f"| {op} | {shape} | {dtype} | {ours_txt} | {peer_txt} | {speedup} | "
                     f"{run['file']} |")
    return "\n".join(lines)


def plots(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_op = defaultdict(list)
    for row in rows:
        by_op[row[1]].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    for op, op_rows in by_op.items():
        fig, ax = plt.subplots(figsize=(max(6, len(op_rows) * 1.2), 4))
        providers = sorted({p for r in op_rows for p in r[4]})
        width = 0.8 / max(len(providers), 1)
        for i, prov in enumerate(providers):
            xs = [j + i * width for j, r in enumerate(op_rows) if prov in r[4]]
            ys = [r[4][prov]["median_ms"] for r in op_rows if prov in r[4]]
            ax.bar(xs, ys, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(op_rows))])
        ax.set_xticklabels([r[2].replace(" ", "\n") for r in op_rows], fontsize=7)
        ax.set_ylabel("median ms (lower is better)")
        ax.set_title(op)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{op.replace('/', '_')}.png", dpi=110)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="Render the README performance table, bench/REPORT.md and the "
        "plots under bench/results/plots/ from the GPU results in bench/results/*.json (no figure is typed).")
    parser.parse_args(argv)
    runs = load_runs()
    rows = comparisons(runs)
    headline = newest_per_card([row for row in rows if row[1] in README_OPS])
    body = table(headline) if headline else "No GPU results committed yet."
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = re.sub(f"{re.escape(START)}.*?{re.escape(END)}", f"{START}\n{body}\n{END}", text, flags=re.S)
    readme.write_text(text)
    (ROOT / "bench" / "REPORT.md").write_text("# Benchmark report (generated by bench/report.py)\n\n"
                                              + (table(rows) if rows else "No GPU results.") + "\n")
    if rows:
        plots(rows, RESULTS / "plots")
    print(f"read {len(runs)} GPU result files from {RESULTS}; wrote the table in {readme} ({len(headline)} rows), "
          f"{ROOT / 'bench' / 'REPORT.md'} ({len(rows)} rows)" + (f" and plots in {RESULTS / 'plots'}" if rows else ""))


if __name__ == "__main__":
    main()
