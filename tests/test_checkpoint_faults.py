"""Checkpoints under faults and hostile files, on 2 gloo ranks with a small FSDP2 model.

Damaged newest checkpoints (truncated or missing shard, corrupt trainer.json / .metadata / manifest, missing
rank file) are detected by the manifest before loading and skipped for the newest valid one, with one line;
none valid is a clear error naming each checkpoint and file. Disk full before or during a save is a clear error
naming the folder and the space needed, and the previous checkpoint stays the one resume uses. Planted pickles
(in `.metadata`, in rank files) never run. The HF export respects the umask and never writes through a link.
"""
import io
import json
import os
import pickle
import random
import shutil
import stat
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed


def _tiny(seed: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_step(model, optim, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 8, generator=generator)).square().sum().backward()
    optim.step()
    optim.zero_grad()


def _weights(model) -> dict:
    # numpy, not tensors: tensors would travel through shared memory that dies with the worker process
    return {k: v.full_tensor().numpy().copy() for k, v in model.state_dict().items()}


def _save_steps(rank, world, root, steps):
    from longvl.eagle.train.checkpoint import Checkpointer, rng_state

    model, optim = _tiny(0)
    ckpt = Checkpointer(root, async_save=True, keep=steps)
    saved = {}
    for step in range(1, steps + 1):
        _train_step(model, optim, step)
        ckpt.save(step, model, optim, {"step": step}, {"rank": rank, "rng": rng_state()})
        ckpt.wait()
        saved[step] = _weights(model)
    ckpt.close()
    return saved


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """step-00000001 and step-00000002 saved by 2 ranks, and the weights each holds."""
    root = tmp_path_factory.mktemp("pristine") / "ckpt"
    weights = run_distributed(_save_steps, 2, str(root), 2, timeout=150)[0]
    return root, weights


def _resume(rank, world, folders):
    from longvl.eagle.train.checkpoint import Checkpointer

    results = {}
    for folder in folders:
        model, optim = _tiny(123)
        out = io.StringIO()
        with redirect_stdout(out):
            try:
                ckpt = Checkpointer(folder, async_save=False)
                latest = ckpt.latest()
                trainer_state, rank_state = ckpt.load(latest, model, optim)
                result = {"ok": latest.name, "trainer": trainer_state, "rank": rank_state, "weights": _weights(model)}
            except Exception as error:  # noqa: BLE001 (the test inspects which error each case gives)
                result = {"error": type(error).__name__, "message": str(error)}
        result["stdout"] = out.getvalue()
        results[Path(folder).name] = result
    return results


def _largest_shard(folder: Path) -> Path:
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


class _OpenOnLoad:
    """Unpickling this creates the file `path`: the stand-in for planted code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _forge_manifest(folder: Path) -> None:
    """What an attacker with write access can do: make the manifest match the planted files."""
    from longvl.eagle.train.manifest import MANIFEST, build_manifest, write_manifest

    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, "COMPLETE"))
    write_manifest(folder, build_manifest(folder, names))


def _damage(case: str, root: Path, marker: Path) -> None:
    newest, older = root / "step-00000002", root / "step-00000001"
    if case == "truncated_shard":
        shard = _largest_shard(newest)
        os.truncate(shard, shard.stat().st_size // 2)
    elif case == "missing_shard":
        sorted(newest.glob("*.distcp"))[-1].unlink()
    elif case == "corrupt_trainer_json":
        (newest / "trainer.json").write_text('{"step": 2,')
    elif case == "missing_rank_file":
        for path in newest.glob("rank-1.*"):
            path.unlink()
    elif case == "truncated_metadata":
        os.truncate(newest / ".metadata", 10)
    elif case == "corrupt_manifest":
        (newest / "manifest.json").write_text("not json")
    elif case == "planted_metadata":
        (newest / ".metadata").write_bytes(pickle.dumps(_OpenOnLoad(marker)))
    elif case == "forged_rank_pickle":
        for name in ("rank-0.pt", "rank-1.pt", "rank-0.json", "rank-1.json"):
            torch.save(_OpenOnLoad(marker), newest / name)
        _forge_manifest(newest)
    elif case == "none_valid":
        sorted(newest.glob("*.distcp"))[-1].unlink()
        (older / "trainer.json").write_text("garbage")
    else:
        raise AssertionError(case)


FALLBACK = {"truncated_shard": ".distcp has", "missing_shard": ".distcp is missing",
            "corrupt_trainer_json": "trainer.json", "missing_rank_file": "rank-1.json is missing",
            "truncated_metadata": ".metadata has 10 bytes", "corrupt_manifest": "manifest.json is unreadable",
            "planted_metadata": ".metadata"}


def test_damaged_newest_checkpoint_falls_back_or_names_the_bad_file(tmp_path, pristine):
    source, weights = pristine
    marker = tmp_path / "payload-ran"
    cases = list(FALLBACK) + ["forged_rank_pickle", "none_valid"]
    for case in cases:
        shutil.copytree(source, tmp_path / case)
        _damage(case, tmp_path / case, marker)
    results = run_distributed(_resume, 2, [str(tmp_path / c) for c in cases], timeout=240)
    assert not marker.exists(), "a planted pickle was executed"
    for rank, per_rank in enumerate(results):
        for case, expected in FALLBACK.items():
            result = per_rank[case]
            assert result.get("ok") == "step-00000001", (case, result)
            assert result["trainer"] == {"step": 1} and result["rank"]["rank"] == rank
            for key, value in weights[1].items():
                np.testing.assert_array_equal(result["weights"][key], value, err_msg=f"{case}: {key}")
            if rank == 0:
                lines = result["stdout"].strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("checkpoint fallback: resuming from step-00000001")
                assert "step-00000002" in lines[0] and expected in lines[0], (case, lines)
        forged = per_rank["forged_rank_pickle"]
        assert forged.get("error") == "CheckpointError", forged
        assert "step-00000002" in forged["message"] and "not readable JSON" in forged["message"]
        none = per_rank["none_valid"]
        assert none.get("error") == "CheckpointError", none
        assert "no usable checkpoint" in none["message"] and ".distcp is missing" in none["message"]
        assert "step-00000001" in none["message"] and "trainer.json" in none["message"]
    for case in FALLBACK:   # kept for inspection, out of the way of the next resume and of pruning
        assert (tmp_path / case / "step-00000002.unusable").is_dir()
        assert not (tmp_path / case / "step-00000002").exists()


def test_rng_state_round_trips_through_json():
    from longvl.eagle.train.checkpoint import rng_state, set_rng_state

    random.gauss(0, 1)
    np.random.standard_normal()        # leaves a cached Gaussian in numpy's state
    state = json.loads(json.dumps(rng_state()))
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert want[:3] == got[:3] and torch.equal(want[3], got[3])


# --- disk full -------------------------------------------------------------------------------------------------
def _disk_full(rank, world, root, full_flag, mode):
    """Save step 1, then step 2 on a disk that is too small (`before`) or fills up during the write (`during`)."""
    import errno

    import torch.distributed.checkpoint.filesystem as fs

    from longvl.eagle.train import checkpoint
    from longvl.eagle.train.checkpoint import Checkpointer, NoSpaceForCheckpoint, estimate_local_bytes
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = _tiny(0)
    ckpt = Checkpointer(root, async_save=True)
    _train_step(model, optim, 1)
    ckpt.save(1, model, optim, {"step": 1}, {"rank": rank})
    ckpt.wait()
    model_sd, optim_sd = get_state_dict(model, optim)
    estimate = torch.tensor([estimate_local_bytes({"model": model_sd, "optim": optim_sd})])
    torch.distributed.all_reduce(estimate)
    written = sum(p.stat().st_size for p in (Path(root) / "step-00000001").glob("*.distcp"))

    real_free = checkpoint.free_bytes
    checkpoint.free_bytes = lambda folder: 1000 if Path(full_flag).exists() else real_free(folder)
    if mode == "before":
        if rank == 0:
            Path(full_flag).touch()
    elif rank == 1:
        class FullDisk(io.RawIOBase):   # the shared disk fills up after a few bytes of rank 1's shard
            def __init__(self, handle):
                self.handle, self.room = handle, 600

            def writable(self):
                return True

            def write(self, data):
                data = memoryview(data)
                if len(data) > self.room:
                    Path(full_flag).touch()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.room -= len(data)
                return self.handle.write(data)

            def tell(self):
                return self.handle.tell()

            def seek(self, *args):
                return self.handle.seek(*args)

            def fileno(self):
                return self.handle.fileno()

        original = fs.FileSystem.create_stream

        def create_stream(self, path, mode):
            with original(self, path, mode) as handle:
                yield FullDisk(handle) if "w" in mode else handle

        fs.FileSystem.create_stream = __import__("contextlib").contextmanager(create_stream)
    _train_step(model, optim, 2)
    with pytest.raises(NoSpaceForCheckpoint) as caught:
        ckpt.save(2, model, optim, {"step": 2}, {"rank": rank})
        ckpt.wait()
    Path(full_flag).unlink(missing_ok=True)
    torch.distributed.barrier()
    left = sorted(p.name for p in Path(root).iterdir())
    latest = ckpt.latest()
    ckpt.close()
    return str(caught.value), left, latest.name, int(estimate.item()), written


@pytest.mark.parametrize("mode", ["before", "during"])
def test_disk_full_is_named_and_previous_checkpoint_stays(tmp_path, mode):
    root = tmp_path / "ckpt"
    results = run_distributed(_disk_full, 2, str(root), str(tmp_path / "disk-full"), mode, timeout=150)
    for message, left, latest, estimate, written in results:
        assert str(root) in message and "needs about" in message, message
        assert "step-00000001 is intact and is the one a restart resumes from" in message, message
        if mode == "during":
            assert "is full" in message and "failed" in message, message
        assert left == ["step-00000001"]                 # no partial step 2 left behind
        assert latest == "step-00000001"                 # the one resume uses, and it verifies
        assert estimate >= written > 0                   # the estimate covers what DCP really wrote


# --- planted files and the HF export ---------------------------------------------------------------------------
def _export(rank, world, out_dirs_and_umasks):
    from transformers import PretrainedConfig

    from longvl.eagle.train.checkpoint import export_hf

    model, _ = _tiny(0)
    for out_dir, umask in out_dirs_and_umasks:
        previous = os.umask(umask)
        try:
            export_hf(model, out_dir, config=PretrainedConfig(), max_shard_bytes=200, dtype=torch.float32)
        finally:
            os.umask(previous)
    return _weights(model) if rank == 0 else None


def test_export_respects_umask_and_never_writes_through_links(tmp_path):
    from safetensors.torch import load_file

    planted = tmp_path / "planted"
    planted.mkdir()
    victims = {}
    shard_names = [f"model-{i:05d}-of-{n:05d}.safetensors" for n in range(1, 6) for i in range(1, n + 1)]
    for name in ["config.json", "model.safetensors.index.json"] + shard_names:
        victim = tmp_path / f"victim-{name}"
        victim.write_text(f"precious {name}")
        (planted / name).symlink_to(victim)
        victims[name] = victim
    jobs = [(str(tmp_path / "umask022"), 0o022), (str(tmp_path / "umask027"), 0o027), (str(planted), 0o022)]
    weights = run_distributed(_export, 1, jobs, timeout=150)[0]
    for out_dir, umask in jobs:
        files = sorted(p for p in Path(out_dir).iterdir() if not p.is_symlink() or p.name not in shard_names)
        assert {p.name for p in files} >= {"config.json", "model.safetensors.index.json"}
        assert not any(p.name.startswith(".") for p in files)          # no staging left behind
        for path in files:
            assert not path.is_symlink() and path.is_file(), path
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, (path, oct(path.stat().st_mode))
        index = json.loads((Path(out_dir) / "model.safetensors.index.json").read_text())
        exported = {}
        for name in sorted(set(index["weight_map"].values())):
            exported.update(load_file(Path(out_dir) / name))
        assert len(set(index["weight_map"].values())) > 1             # sharded: several planted names in play
        for key, value in weights.items():
            np.testing.assert_array_equal(exported[key].numpy(), value)
    exported_shards = set(json.loads((planted / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert exported_shards <= set(shard_names)                         # each one replaced a planted link
    for name, victim in victims.items():
        assert victim.read_text() == f"precious {name}", f"export wrote through the link {name}"


def test_write_atomic_replaces_a_planted_link(tmp_path):
    from longvl.eagle.train.atomic_files import write_atomic

    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "trainer.json").symlink_to(victim)
    write_atomic(tmp_path / "trainer.json", '{"step": 1}')
    assert victim.read_text() == "precious"
    assert not (tmp_path / "trainer.json").is_symlink()
    assert json.loads((tmp_path / "trainer.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer.json", "victim"]
