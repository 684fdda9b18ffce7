"""End to end on the synthetic dataset: generator -> index -> sampler -> workers -> collated batches.

Uses the real EagleProcessor (small tiles, few tokens per tile, the built-in tokenizer) through
longvl.eagle.data.eagle_backend, plus a wrapper that injects slow and mis-planned samples.
"""
import json
import os
import shutil
import time

import pytest
import torch

from longvl.eagle.data import build_indexes
from longvl.eagle.data import build_loader as _build_loader
from longvl.eagle.data.backend import BackendSpec, ProcessorBackend
from longvl.eagle.data.dataset import DatasetSource, PackDataset
from longvl.eagle.data.index import index_path, load_index
from longvl.eagle.data.index import main as index_main
from longvl.eagle.data.loader import measure
from longvl.eagle.data.mixture import load_mixture
from longvl.eagle.data.sampler import DocRef, PackRequest
from longvl.eagle.data.synthetic import generate

MAX_LENGTH = 4096
TOKENS_PER_TILE = 16
OPTIONS = {"tile_size": 28, "tokens_per_tile": TOKENS_PER_TILE, "max_tiles": 4, "min_frames": 2, "max_frames": 16}
BACKEND = BackendSpec("longvl.eagle.data.eagle_backend:EagleBackend", OPTIONS)
IMAGE_TOKEN = None  # the built-in tokenizer's <IMG_CONTEXT>, read once below


def build_loader(*args, **kwargs):
    """The stage loader with the processor's image placement (the built-in tokenizer, OPTIONS' tokens per tile)."""
    global IMAGE_TOKEN
    if IMAGE_TOKEN is None:
        from longvl.eagle.processing.tokenizer import IMG_CONTEXT, tiny_tokenizer

        IMAGE_TOKEN = tiny_tokenizer().convert_tokens_to_ids(IMG_CONTEXT)
    return _build_loader(*args, image_token_id=IMAGE_TOKEN, tokens_per_tile=TOKENS_PER_TILE, **kwargs)


EXPECTED_BAD = {"missing_file": 1, "corrupt_media": 2, "path_escape": 1, "image_too_large": 1, "malformed": 2,
                "too_long": 1}


class FaultyBackend(ProcessorBackend):
    """The real backend, except that chosen records sleep (timeouts) or come out longer than planned."""

    def __init__(self, slow=(), longer=(), **options):
        from longvl.eagle.data.eagle_backend import EagleBackend
        self.inner = EagleBackend(**options)
        self.slow, self.longer = set(slow), set(longer)

    def plan(self, record, max_length):
        return self.inner.plan(record, max_length)

    def process(self, record, max_length, video_meta):
        if record.id in self.slow:
            time.sleep(30)
        sample = self.inner.process(record, max_length, video_meta)
        if record.id in self.longer:
            sample["input_ids"] = torch.cat([sample["input_ids"], sample["input_ids"][:1].repeat(MAX_LENGTH)])
        return sample


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summary = generate(str(out), num=40, seed=0)
    assert summary == {"records": 40, "broken": 8}
    report = build_indexes(str(out / "mixture.yaml"), MAX_LENGTH, BACKEND, workers=0)
    return out, report


def test_index_accounts_for_every_record_and_reports_throughput(dataset_dir):
    out, report = dataset_dir
    assert report["records"] == 48
    assert report["bad_samples"]["by_reason"] == EXPECTED_BAD
    assert report["samples_per_second"] > 0 and "bad samples: 8" in report["bad_summary"]
    events = report["bad_sample_log"].events
    ids = {event.id for event in events}
    assert {"bad-missing", "bad-corrupt-image", "bad-escape", "bad-corrupt-video", "bad-too-long", "bad-huge-image",
            "bad-null-conversations"} <= ids
    truncated = next(event for event in events if event.id.startswith("single_image:"))  # named by its place
    lines = (out / "single_image.jsonl").read_bytes().split(b"\n")
    line = next(n for n, text in enumerate(lines, start=1) if text.startswith(b'{"id": "bad-malformed"'))
    assert truncated.file == str(out / "single_image.jsonl") and truncated.position == f"line {line}"
    assert truncated.reason == "malformed" and "invalid JSON" in truncated.detail
    for spec in load_mixture(str(out / "mixture.yaml")).datasets:
        index = load_index(spec, MAX_LENGTH)
        assert len(index.records) + len(index.excluded) == report["datasets"][spec.name]["records"]
        assert (index.lengths > 0).all() and (index.lengths <= MAX_LENGTH).all()
        if spec.name == "video":
            assert (index.frames >= 2).all() and len(index.video_meta) == len(index.records)
            assert {"num_frames", "fps"} <= set(next(iter(index.video_meta.values()))[0])


def test_synthetic_media_vary_in_size_and_the_commands_report(dataset_dir, tmp_path, capsys):
    out, _ = dataset_dir
    from PIL import Image
    sizes = {Image.open(path).size for path in (out / "images").glob("img_*")}
    assert len({round(w / h, 2) for w, h in sizes}) >= 8 and max(w * h for w, h in sizes) >= 1920 * 1080
    shutil.copytree(out, tmp_path / "data")
    index_main(["--data", str(tmp_path / "data" / "mixture.yaml"), "--max-length", str(MAX_LENGTH),
                "--workers", "0", "--backend", BACKEND.factory, "--backend-kwargs", json.dumps(OPTIONS)])
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "bad samples: 8" in printed and "video: 10/11 usable" in printed


def test_index_refuses_stale_or_missing_files(dataset_dir, tmp_path):
    out, _ = dataset_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    spec = load_mixture(str(copy / "mixture.yaml")).datasets[3]
    with open(spec.annotation, "a", encoding="utf-8") as handle:
        handle.write("\n")
    with pytest.raises(ValueError, match="stale"):
        load_index(spec, MAX_LENGTH)
    with pytest.raises(FileNotFoundError, match="python -m longvl.eagle.data.index"):
        load_index(spec, 512)
    short = build_indexes(str(copy / "mixture_video_heavy.yaml"), 512, BACKEND)  # degrade sampling kicks in
    assert short["datasets"]["video"]["degraded"] > 0
    video_spec = load_mixture(str(copy / "mixture.yaml")).datasets[2]
    short_index, full_index = load_index(video_spec, 512), load_index(video_spec, MAX_LENGTH)
    full_frames = dict(zip(full_index.records.tolist(), full_index.frames.tolist()))
    fewer = [full_frames[r] - f for r, f in zip(short_index.records.tolist(), short_index.frames.tolist())]
    assert (short_index.lengths <= 512).all() and min(fewer) >= 0 and max(fewer) > 0
    other = BackendSpec(BACKEND.factory, dict(OPTIONS, max_tiles=2))
    with pytest.raises(ValueError, match="rerun"):
        load_index(load_mixture(str(copy / "mixture.yaml")).datasets[0], MAX_LENGTH, other)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        build_indexes(str(copy / "mixture.yaml"), 0, BACKEND)


def _check_batch(batch):
    ids, cu = batch.input_ids[0], batch.cu_seqlens
    assert ids.numel() == int(cu[-1]) <= MAX_LENGTH
    assert batch.stats.tiles == batch.pixel_values.shape[0]
    image_token = int(batch.input_ids.max())  # <IMG_CONTEXT> is the last added token
    if batch.pixel_values.shape[0]:
        assert int((ids == image_token).sum()) == batch.pixel_values.shape[0] * TOKENS_PER_TILE
        assert batch.feature_index[0][ids == image_token].tolist() == list(range(int((ids == image_token).sum())))
    positions = batch.position_ids[0]
    assert (positions[cu[:-1].long()] == 0).all() and torch.isfinite(batch.pixel_values).all()
    if batch.stats.supervised_tokens:
        assert abs(float(batch.loss_weights.sum()) - 1) < 1e-5


def _keys(batches):
    return [batch.stats.doc_keys for batch in batches]


def test_loader_epoch_resume_and_bad_sample_summary(dataset_dir):
    out, _ = dataset_dir
    mixture = str(out / "mixture_video_heavy.yaml")
    build_indexes(mixture, MAX_LENGTH, BACKEND)  # same lengths: the index is per (dataset, max length)
    loader = build_loader(mixture, MAX_LENGTH, BACKEND, num_workers=0, seed=3, pad_to_multiple_of=8)
    epoch = list(loader)
    assert len(epoch) == len(loader.sampler._plan(0).packs)
    for batch in epoch:
        _check_batch(batch)
        assert batch.input_ids.shape[1] % 8 == 0
    assert sum(b.stats.frames for b in epoch) > sum(b.stats.images for b in epoch)  # video-heavy
    assert loader.bad_samples.total == 0 and loader.summary().startswith("bad samples: 8 (")
    assert loader.summary().endswith("excluded by the index, 0 skipped while loading, 0 packs without a usable "
                                     "document")
    assert loader.state_dict()["epoch"] == 0  # saved after the last batch; the next loop starts epoch 1

    resumed = build_loader(mixture, MAX_LENGTH, BACKEND, num_workers=0, seed=3, pad_to_multiple_of=8)
    stop = len(epoch) // 3
    for batch in resumed:
        if _keys([batch]) == _keys(epoch[stop:stop + 1]):
            break
    state = resumed.state_dict()
    fresh = build_loader(mixture, MAX_LENGTH, BACKEND, num_workers=0, seed=3, pad_to_multiple_of=8)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    rest = list(fresh)
    assert _keys(rest) == _keys(epoch[stop + 1:])
    for a, b in zip(rest, epoch[stop + 1:]):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert _keys(list(fresh)) != _keys(epoch)  # then epoch 1, in a new order


def test_pack_dataset_skips_timeouts_overlong_and_vanished_samples(dataset_dir, tmp_path):
    out, _ = dataset_dir
    shutil.copytree(out, tmp_path / "data")
    spec = load_mixture(str(tmp_path / "data" / "mixture.yaml")).datasets[0]
    index = load_index(spec, MAX_LENGTH)
    docs = tuple(DocRef(0, int(index.records[i]), int(index.offsets[i]), int(index.lengths[i]), [])
                 for i in range(3))
    faulty = BackendSpec("tests.test_data_loader:FaultyBackend",
                         dict(OPTIONS, slow=["si-00000"], longer=["si-00001"]))
    dataset = PackDataset([DatasetSource(spec.name, spec.annotation, spec.root)], faulty, MAX_LENGTH, timeout_s=1.0)
    assert dataset[PackRequest((), {})].docs == []  # builds the backend outside the timed part
    start = time.perf_counter()
    pack = dataset[PackRequest(docs, {"step": 1})]
    assert time.perf_counter() - start < 20
    assert [(e.id, e.reason) for e in pack.bad_samples] == [("si-00000", "timeout"),
                                                                   ("si-00001", "length_mismatch")]
    assert [doc["id"] for doc in pack.docs] == ["si-00002"] and pack.state == {"step": 1}
    with open(spec.annotation, "rb") as handle:
        handle.seek(docs[2].offset)
        image = json.loads(handle.readline())["image"]
    os.remove(os.path.join(spec.root, image))  # media deleted after indexing
    pack = dataset[PackRequest(docs[2:], {})]
    assert pack.docs == [] and pack.bad_samples[0].reason == "missing_file"
    assert (pack.bad_samples[0].file, pack.bad_samples[0].position) == (spec.annotation, f"byte {docs[2].offset}")


def test_pack_dataset_uses_the_index_video_metadata(dataset_dir, monkeypatch):
    """Processing takes frame counts and fps from the index: no video container is opened for metadata."""
    out, _ = dataset_dir
    spec = next(s for s in load_mixture(str(out / "mixture.yaml")).datasets if s.name == "video")
    index = load_index(spec, MAX_LENGTH)
    docs = tuple(DocRef(0, int(index.records[i]), int(index.offsets[i]), int(index.lengths[i]),
                        index.video_meta[int(index.records[i])]) for i in range(2))
    dataset = PackDataset([DatasetSource(spec.name, spec.annotation, spec.root)], BACKEND, MAX_LENGTH)
    reads = []
    monkeypatch.setattr("longvl.eagle.processor.read_video_meta", lambda *args, **kwargs: reads.append(args))
    pack = dataset[PackRequest(docs, {})]
    assert pack.bad_samples == [] and reads == []
    assert [len(doc["input_ids"]) for doc in pack.docs] == [doc.length for doc in docs]
    assert all(doc["frames"] >= 2 for doc in pack.docs)
    stale = DocRef(0, docs[0].record, docs[0].offset, docs[0].length, docs[0].video_meta * 2)
    assert dataset[PackRequest((stale,), {})].bad_samples[0].reason == "process_error"


def test_spawn_workers_match_in_process_loading(dataset_dir):
    """Two spawn workers with prefetching yield exactly the in-process batches, bad samples included."""
    out, _ = dataset_dir
    mixture = str(out / "mixture.yaml")
    reference = list(build_loader(mixture, MAX_LENGTH, BACKEND, num_workers=0, seed=1, world_size=2, rank=1))
    loader = build_loader(mixture, MAX_LENGTH, BACKEND, num_workers=2, prefetch_factor=2, seed=1, world_size=2,
                          rank=1)
    batches = list(loader)
    assert _keys(batches) == _keys(reference)
    for a, b in zip(batches, reference):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_weights, b.loss_weights)
        _check_batch(a)


def test_index_with_spawn_pool_matches_in_process(dataset_dir, tmp_path):
    out, _ = dataset_dir
    shutil.copytree(out, tmp_path / "data")
    mixture = str(tmp_path / "data" / "mixture.yaml")
    pooled = build_indexes(mixture, 3000, BACKEND, workers=2)
    assert pooled["startup_seconds"] > 0 and pooled["samples_per_second"] > 0
    rows = {}
    for spec in load_mixture(mixture).datasets:
        with open(index_path(spec, 3000), encoding="utf-8") as handle:
            rows[spec.name] = [json.loads(line) for line in handle][1:]
    build_indexes(mixture, 3000, BACKEND, workers=0)
    for spec in load_mixture(mixture).datasets:
        with open(index_path(spec, 3000), encoding="utf-8") as handle:
            assert [json.loads(line) for line in handle][1:] == rows[spec.name]
    assert pooled["bad_samples"]["by_reason"]["path_escape"] == 1


def test_measure_reports_data_share(dataset_dir):
    out, _ = dataset_dir
    loader = build_loader(str(out / "mixture.yaml"), MAX_LENGTH, BACKEND, num_workers=0)
    result = measure(loader, steps=3, step_seconds=0.01)
    assert result["batches"] == 3 and result["tokens"] > 0 and 0 < result["data_share"] <= 1
