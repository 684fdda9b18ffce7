"""The benchmark tooling: results files, the regression guard, the generated report, the train bench's data part."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare, harness, report


def _results(**medians):
    return {"suite": "s", "env": {"device": "NVIDIA H200"}, "ceilings": {},
            "records": [{"op": "op", "provider": p, "shape": {"n": 1}, "dtype": "bf16", "median_ms": ms,
                         "metric": None, "value": None, "peak_extra_mib": None, "device": "gpu"}
                        for p, ms in medians.items()]}


def test_regression_guard_flags_only_ours_beyond_threshold():
    old = _results(ours=1.0, eager=2.0)
    assert compare.regressions(_results(ours=1.04, eager=3.0), old) == []
    found = compare.regressions(_results(ours=1.10, eager=2.0), old)
    assert len(found) == 1 and found[0][3] == pytest.approx(0.10)


def test_compare_command_exit_code(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_results(ours=1.0)))
    new.write_text(json.dumps(_results(ours=1.2)))
    assert compare.main([str(new), str(old)]) == 1
    new.write_text(json.dumps(_results(ours=0.9)))
    assert compare.main([str(new), str(old)]) == 0


def test_save_results_records_environment(tmp_path):
    rec = harness.Record(op="op", provider="ours", shape={"n": 3}, dtype="bf16", median_ms=1.5)
    path = harness.save_results([rec], {}, "unit", out_dir=tmp_path)
    data = json.loads(path.read_text())
    assert data["suite"] == "unit" and data["records"][0]["median_ms"] == 1.5
    assert {"torch", "triton", "device", "date"} <= set(data["env"])


def test_report_table_compares_ours_with_best_peer():
    run = _results(ours=1.0, eager=3.0, liger=2.0)
    run["file"] = "x.json"
    table = report.table(report.comparisons([run]))
    assert "liger" in table and "2.00x" in table


def test_readme_table_keeps_the_newest_run_of_each_card():
    runs = []
    for device, date, ours in (("H100", "2026-12-01", 2.0), ("H100", "2026-12-05", 1.0), ("H200", "2026-11-30", 3.0)):
        run = _results(ours=ours, liger=4.0)
        run["env"] = {"device": device, "date": date}
        run["file"] = f"{device}_{date}.json"
        runs.append(run)
    kept = report.newest_per_card(report.comparisons(runs))
    assert sorted(row[0]["file"] for row in kept) == ["H100_2026-12-05.json", "H200_2026-11-30.json"]


def test_median_ms_times_a_function():
    calls = []
    assert harness.median_ms(lambda: calls.append(1)) >= 0 and len(calls) >= 2


def test_train_bench_data_part_runs_the_trainer_loader_on_cpu(tmp_path):
    """`--parts data` end to end at tiny size: generated data, offline index, a spawned worker, real steps."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "bench.bench_train", "--size", "tiny", "--parts", "data", "--data-length", "1024",
               "--data-samples", "24", "--data-long-videos", "0", "--data-workers", "1", "--warmup", "1",
               "--data-steps", "2", "--data-dir", str(tmp_path / "data")]
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, BENCH_OUT=str(tmp_path), PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (path,) = tmp_path.glob("train_*.json")
    (record,) = [r for r in json.loads(path.read_text())["records"] if r["op"] == "train_data_share"]
    assert 0 <= record["value"] <= 1 and record["median_ms"] > 0 and record["shape"]["workers"] == 1
    assert "'steps': 2" in record["note"] and "video_heavy" in record["note"]


REPO = Path(__file__).resolve().parent.parent


def _results_snapshot():
    return sorted(p.name for p in (REPO / "bench" / "results").rglob("*") if p.is_file())


@pytest.mark.skipif(harness.ON_GPU, reason="checks the suite's behaviour on a machine without a GPU")
def test_suite_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    before = _results_snapshot()
    out = tmp_path / "new" / "folder"
    result = subprocess.run([sys.executable, "-m", "bench", "--out", str(out), "-k", "no_such_benchmark"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 5, result.stdout + result.stderr  # pytest: no benchmark matched -k
    assert out.is_dir()                                            # --out is created
    plain = subprocess.run([sys.executable, "-m", "bench", "-k", "no_such_benchmark"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert "no CUDA GPU" in plain.stdout
    assert _results_snapshot() == before                           # nothing lands in bench/results/


def test_report_help_and_summary_line(tmp_path, monkeypatch):
    help_text = subprocess.run([sys.executable, "-m", "bench.report", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert help_text.returncode == 0 and "README" in help_text.stdout
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "ROOT", tmp_path)
    (tmp_path / "README.md").write_text(f"x\n{report.START}\nold\n{report.END}\n")
    (tmp_path / "bench").mkdir()
    report.main([])
    assert "No GPU results committed yet." in (tmp_path / "README.md").read_text()


def test_tune_norm_rope_documents_itself_and_checks_its_arguments(tmp_path, capsys):
    import torch

    from bench import tune_norm_rope

    with pytest.raises(SystemExit) as exited:
        tune_norm_rope.main(["--help"])
    assert exited.value.code == 0 and "--out" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        tune_norm_rope.main(["--out", str(tmp_path), "--norm-shapes", "4096by3584"])
    assert exited.value.code == 2 and "TOKENSxHIDDEN" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exited:
            tune_norm_rope.main(["--out", str(tmp_path / "sweep")])
        assert exited.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
