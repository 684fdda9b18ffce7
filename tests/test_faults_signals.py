"""SIGTERM and SIGINT end to end: the demo-sized trainer under torchrun (2 gloo processes) is stopped by a signal,
saves a complete checkpoint, exits non-zero with one line naming it, and the resumed run's losses equal those
of an uninterrupted run exactly. A signal that reaches one rank only still stops every rank after the same step.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from longvl.eagle.train.metrics import read_jsonl
from tests.test_train_e2e import REPO, _finish, _kill_tree, _torchrun, data_dir, descendants, write_config  # noqa: F401

STAGE = [{"name": "s", "max_length": 512, "cp": 1, "steps": 12, "lr": 2e-3, "warmup_fraction": 0.1}]
SECTIONS = {"checkpoint": {"interval": 5, "async_save": True}}


def _worker_pid(launcher: int, rank: int) -> int:
    """The torchrun worker of global rank `rank` under `launcher`."""
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def _wait_for_steps(proc, metrics: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(read_jsonl(metrics)) >= steps):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"run did not reach step {steps}"
        time.sleep(0.05)


def _stopped(proc, name: str, world: int, timeout: float = 120) -> tuple[str, int, Path]:
    """Wait for a run stopped by signal `name`; return (output, step, checkpoint) from its one line."""
    from longvl.eagle.train.checkpoint import MARKER
    from longvl.eagle.train.manifest import check_files, read_manifest

    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        raise
    assert proc.returncode != 0, out[-4000:]
    lines = re.findall(rf"^stopped by {name} after step (\d+): checkpoint (\S+) is complete .*$", out, re.M)
    assert len(lines) == 1, out[-4000:]
    step, checkpoint = int(lines[0][0]), Path(lines[0][1])
    assert checkpoint.name == f"step-{step:08d}" and (checkpoint / MARKER).is_file()
    manifest = read_manifest(checkpoint)
    assert check_files(checkpoint, manifest, sorted(manifest.files)) is None
    assert {".metadata", "trainer.json"} | {f"rank-{r}.json" for r in range(world)} <= set(manifest.files)
    return out, step, checkpoint


def test_sigterm_and_sigint_checkpoint_then_resume_exactly(tmp_path, data_dir):
    reference = write_config(tmp_path / "reference", data_dir, STAGE, **SECTIONS)
    _finish(_torchrun(reference, 2))
    config = write_config(tmp_path / "stopped", data_dir, STAGE, **SECTIONS)
    metrics = tmp_path / "stopped" / "metrics" / "metrics.jsonl"

    # SIGTERM to the launcher, as a scheduler or `kill` does: it forwards SIGTERM to both workers.
    proc = _torchrun(config, 2)
    _wait_for_steps(proc, metrics, 3)
    proc.send_signal(signal.SIGTERM)
    _, first_stop, _ = _stopped(proc, "SIGTERM", 2)
    assert 3 <= first_stop < 12 and len(read_jsonl(metrics)) == first_stop

    # SIGINT to rank 1 only: rank 0 never gets a signal and must still stop after the same step.
    proc = _torchrun(config, 2)
    _wait_for_steps(proc, metrics, first_stop + 2)
    os.kill(_worker_pid(proc.pid, 1), signal.SIGINT)
    out, second_stop, _ = _stopped(proc, "SIGINT", 2)
    assert f"resumed from {tmp_path / 'stopped' / 'ckpt' / f'step-{first_stop:08d}'}" in out
    assert first_stop + 2 <= second_stop < 12
    assert re.search(r"exitcode\s*:\s*130\b", out), out[-4000:]        # 128 + SIGINT, reported by torchrun

    out = _finish(_torchrun(config, 2))
    assert f"step-{second_stop:08d}" in out.split("resumed from")[1].splitlines()[0]
    want = read_jsonl(tmp_path / "reference" / "metrics" / "metrics.jsonl")
    got = read_jsonl(metrics)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in want]


def test_sigterm_single_process_exit_code_and_line(tmp_path, data_dir):
    config = write_config(tmp_path, data_dir, [dict(STAGE[0], steps=8)], checkpoint={"interval": 0})
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "longvl.eagle.train", "--config", str(config)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics" / "metrics.jsonl"
    _wait_for_steps(proc, metrics, 2)
    proc.send_signal(signal.SIGTERM)
    out, step, checkpoint = _stopped(proc, "SIGTERM", 1)
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert step < 8 and checkpoint.parent == tmp_path / "ckpt"
    assert "Traceback" not in out, out[-4000:]
