"""Regression guard: compare a new results JSON with a committed one and flag slower kernels.

    python -m bench.compare NEW.json [OLD.json] [--threshold 0.05]

Records are matched on (op, provider, shape, dtype). OLD defaults to the newest committed results file of
the same suite and device. Exits 1 when any of our records got more than `threshold` slower.
"""
import argparse
import json
import sys
from pathlib import Path

from bench.report import RESULTS


def _key(rec):
    return rec["op"], rec["provider"], json.dumps(rec["shape"], sort_keys=True), rec["dtype"]


def regressions(new: dict, old: dict, threshold: float = 0.05, provider: str = "ours"):
    """(key, old_ms, new_ms, slowdown) for every matched record of `provider` slower by more than threshold."""
    old_by_key = {_key(r): r for r in old["records"]}
    found = []
    for rec in new["records"]:
        base = old_by_key.get(_key(rec))
        if rec["provider"] != provider or base is None:
            continue
        slowdown = rec["median_ms"] / base["median_ms"] - 1
        if slowdown > threshold:
            found.append((_key(rec), base["median_ms"], rec["median_ms"], slowdown))
    return found


def _default_baseline(new_path: Path, new: dict) -> Path | None:
    same = [p for p in sorted(RESULTS.glob("*.json"))
            if p.resolve() != new_path.resolve()
            and (d := json.loads(p.read_text())).get("suite") == new.get("suite")
            and d.get("env", {}).get("device") == new.get("env", {}).get("device")]
    return same[-1] if same else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", type=Path)
    parser.add_argument("old", type=Path, nargs="?")
    parser.add_argument("--threshold", type=float, default=0.05)
    args = parser.parse_args(argv)
    new = json.loads(args.new.read_text())
    old_path = args.old or _default_baseline(args.new, new)
    if old_path is None:
        print("no committed baseline of the same suite and device: nothing to compare")
        return 0
    found = regressions(new, json.loads(old_path.read_text()), args.threshold)
    for (op, provider, shape, dtype), old_ms, new_ms, slowdown in found:
        print(f"SLOWER {op} {shape} {dtype}: {old_ms:.3f} -> {new_ms:.3f} ms (+{slowdown:.1%})")
    print(f"compared with {old_path.name}: {len(found)} regression(s) over {args.threshold:.0%}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
