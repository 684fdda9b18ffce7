"""Hostile and unlucky data, scripted: every bad record is skipped and counted with its file, position and
reason (never a crash of the index or the run), bad media stay handled, a pack without any usable document
says so, the indexer runs no code named on its command line and writes nothing outside the data folder
(or the cache folder named), bad samples are summarised once, and the demo's generated data fits its stages.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from longvl.eagle.data.backend import BackendError, BackendSpec, ProcessorBackend
from longvl.eagle.data.collate import collate_pack
from longvl.eagle.data.dataset import DatasetSource, PackDataset
from longvl.eagle.data.index import build_indexes, index_is_current, index_path, load_index
from longvl.eagle.data.index import main as index_main
from longvl.eagle.data.loader import build_loader as _build_loader
from longvl.eagle.data.loader import is_empty_pack
from longvl.eagle.data.mixture import load_mixture
from longvl.eagle.data.records import AnnotationFileError
from longvl.eagle.data.sampler import DocRef, PackRequest
from longvl.eagle.data.synthetic import _write_png_declaring, generate

OPTIONS = {"tile_size": 28, "tokens_per_tile": 16, "max_tiles": 4, "min_frames": 2, "max_frames": 8}
BACKEND = BackendSpec("longvl.eagle.data.eagle_backend:EagleBackend", OPTIONS)


def build_loader(*args, **kwargs):
    """The stage loader with the built-in tokenizer's image token and OPTIONS' tokens per tile."""
    from longvl.eagle.processing.tokenizer import IMG_CONTEXT, tiny_tokenizer

    image_token = tiny_tokenizer().convert_tokens_to_ids(IMG_CONTEXT)
    return _build_loader(*args, image_token_id=image_token, tokens_per_tile=OPTIONS["tokens_per_tile"], **kwargs)
MAX_LENGTH = 2048
TURNS = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A red square."}]

# Each would crash the index or the run before: one line each, between good records.
BAD_LINES = {
    "conversations-int": json.dumps({"id": "c-int", "conversations": 5}).encode(),
    "conversations-null": json.dumps({"id": "c-null", "conversations": None}).encode(),
    "from-list": json.dumps({"id": "from-list", "conversations": [{"from": ["human"], "value": "q"},
                                                                   {"from": "gpt", "value": "a"}]}).encode(),
    "nul-path": json.dumps({"id": "nul", "image": "a\x00.png", "conversations": TURNS}).encode(),
    "not-utf8": b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}, '
                b'{"from": "gpt", "value": "x"}]}',
    "lone-surrogate": b'{"id": "surrogate", "conversations": [{"from": "human", "value": "\\ud800"}, '
                      b'{"from": "gpt", "value": "x"}]}',
    "nested-too-deep": b"[" * 100_000 + b"]" * 100_000,
    "messages-null": json.dumps({"id": "m-null", "messages": None}).encode(),
    "text-part-int": json.dumps({"id": "part-int", "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}, {"role": "assistant", "content": "x"}]}).encode(),
}


def _good(number):
    return json.dumps({"id": f"good-{number}", "image": "a.png", "conversations": TURNS}).encode()


def _write_mixture(folder, entries):
    path = folder / "mixture.yaml"
    path.write_text(yaml.safe_dump({"datasets": entries}))
    return str(path)


@pytest.fixture
def hostile(tmp_path):
    """A data folder whose JSONL file holds a bad line of every kind after every good record."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(data / "a.png")
    lines, bad_line_numbers = [], {}
    for number, (kind, line) in enumerate(BAD_LINES.items()):
        lines.append(_good(number))
        lines.append(line)
        bad_line_numbers[kind] = len(lines)
    (data / "records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    mixture = _write_mixture(data, [{"name": "records", "annotation": "records.jsonl"}])
    return data, mixture, bad_line_numbers


def test_bad_records_are_skipped_and_counted_with_file_line_and_reason(hostile, caplog):
    data, mixture, bad_line_numbers = hostile
    with caplog.at_level("INFO"):
        report = build_indexes(mixture, MAX_LENGTH, BACKEND)
    events = report["bad_sample_log"].events
    assert report["datasets"]["records"]["usable"] == len(BAD_LINES)
    assert sorted(event.position for event in events) == sorted(f"line {n}" for n in bad_line_numbers.values())
    assert {event.reason for event in events} == {"malformed"}
    assert {event.file for event in events} == {str(data / "records.jsonl")}
    by_position = {event.position: event for event in events}
    assert "not UTF-8" in by_position[f"line {bad_line_numbers['not-utf8']}"].detail
    assert "NUL" in by_position[f"line {bad_line_numbers['nul-path']}"].detail
    assert by_position[f"line {bad_line_numbers['from-list']}"].id == "from-list"
    assert report["bad_summary"] == f"bad samples: {len(BAD_LINES)} (malformed {len(BAD_LINES)}); by dataset: " \
                                    f"records {len(BAD_LINES)}"
    assert [r for r in caplog.records if r.name.startswith("longvl")] == []  # no line per bad sample

    loader = build_loader(mixture, MAX_LENGTH, BACKEND, num_workers=0)
    batches = list(loader)
    ids = sorted(doc_id for batch in batches for _, doc_id in batch.stats.doc_keys)
    assert ids == sorted(f"good-{n}" for n in range(len(BAD_LINES))) and loader.bad_samples.total == 0


def test_the_worker_parses_bad_records_inside_the_guarded_call(hostile):
    """Records reaching a loader worker unindexed (an index from another tool, a file edited in place) are
    events too, with the file and byte offset, not an exception that kills the worker."""
    data, mixture, _ = hostile
    spec = load_mixture(mixture).datasets[0]
    content = (data / "records.jsonl").read_bytes()
    offsets = [0] + [i + 1 for i, byte in enumerate(content[:-1]) if byte == ord("\n")]
    docs = tuple(DocRef(0, number, offset, 1, []) for number, offset in enumerate(offsets))
    dataset = PackDataset([DatasetSource(spec.name, spec.annotation, spec.root)], BACKEND, MAX_LENGTH)
    pack = dataset[PackRequest(docs, {})]
    assert [doc["id"] for doc in pack.docs] == [f"good-{n}" for n in range(len(BAD_LINES))]
    assert len(pack.bad_samples) == len(BAD_LINES)
    assert {event.reason for event in pack.bad_samples} == {"malformed"}
    assert [event.position for event in pack.bad_samples] == [f"byte {o}" for o in offsets[1::2]]


LATIN1 = b'[{"id": "caf\xe9"}]'.index(b"\xe9")


def test_json_list_files(tmp_path):
    """One bad entry of a .json list is skipped and counted; a file unusable as a whole is a clear error naming
    the file and the position."""
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    good = {"id": "ok", "image": "a.png", "conversations": TURNS}
    (tmp_path / "list.json").write_text(json.dumps([good, 5, None, {"id": "bad", "conversations": 3}, good]))
    mixture = _write_mixture(tmp_path, [{"name": "list", "annotation": "list.json"}])
    report = build_indexes(mixture, MAX_LENGTH, BACKEND)
    assert [(e.position, e.reason) for e in report["bad_sample_log"].events] == [
        ("entry 1", "malformed"), ("entry 2", "malformed"), ("entry 3", "malformed")]
    assert report["datasets"]["list"]["usable"] == 2
    truncated = json.dumps([good, good])[:-30].encode()
    for content, message in ((truncated, r"invalid JSON at line 1 column \d+ .*truncated"),
                             (json.dumps({"records": [good]}).encode(), "must hold a list of records, got a JSON dict"),
                             (b'[{"id": "caf\xe9"}]', f"not UTF-8 at line 1 column {LATIN1 + 1} \\(byte {LATIN1}\\)")):
        (tmp_path / "list.json").write_bytes(content)
        with pytest.raises(AnnotationFileError, match=message) as caught:
            build_indexes(mixture, MAX_LENGTH, BACKEND)
        assert str(tmp_path / "list.json") in str(caught.value)


def test_bad_media_stay_handled(tmp_path):
    """Missing, zero-byte, truncated and bomb images, corrupt and zero-frame videos, paths escaping the data
    root or leaving it through a symlink, and over-long samples: each skipped, counted, with its reason."""
    import cv2
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    Image.new("RGB", (64, 48)).save(outside / "secret.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / "whole.png")
    (data / "zero.png").write_bytes(b"")
    (data / "truncated.png").write_bytes((data / "whole.png").read_bytes()[:400])  # header fine, pixels cut
    _write_png_declaring(str(data / "bomb.png"), (20000, 20000))  # over twice Pillow's limit
    (data / "corrupt.mp4").write_bytes(rng.bytes(4096))
    cv2.VideoWriter(str(data / "empty.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32)).release()
    os.symlink(outside / "secret.png", data / "link.png")
    records = {"missing": {"image": "gone.png"}, "zero-byte": {"image": "zero.png"},
               "truncated": {"image": "truncated.png"}, "bomb": {"image": "bomb.png"},
               "corrupt-video": {"video": "corrupt.mp4"}, "zero-frames": {"video": "empty.mp4"},
               "escape": {"image": "../outside/secret.png"}, "symlink": {"image": "link.png"},
               "good": {"image": "whole.png"}}
    lines = [json.dumps({"id": name, **media, "conversations": TURNS}) for name, media in records.items()]
    lines.append(json.dumps({"id": "too-long", "conversations": [TURNS[0], {"from": "gpt", "value": "word " * 5000}]}))
    (data / "media.jsonl").write_text("\n".join(lines) + "\n")
    mixture = _write_mixture(data, [{"name": "media", "annotation": "media.jsonl"}])
    report = build_indexes(mixture, MAX_LENGTH, BACKEND)
    reasons = {event.id: event.reason for event in report["bad_sample_log"].events}
    assert reasons == {"missing": "missing_file", "zero-byte": "corrupt_media", "bomb": "corrupt_media",
                       "corrupt-video": "corrupt_media", "zero-frames": "corrupt_media", "escape": "path_escape",
                       "symlink": "path_escape", "too-long": "too_long"}
    loader = build_loader(mixture, MAX_LENGTH, BACKEND, num_workers=0)
    assert sorted(key for batch in loader for key in batch.stats.doc_keys) == [("media", "good")]
    assert [(e.id, e.reason) for e in loader.bad_samples.events] == [("truncated", "corrupt_media")]


def test_a_pack_without_usable_documents_says_so_and_is_reported(hostile, tmp_path, caplog):
    """Media deleted after indexing: every document of every pack fails at load time. Each batch still comes out
    (ranks stay in step) and `is_empty_pack` tells the trainer to skip its optimizer step; the summary is one
    line and the details file lists every sample with file, position and reason."""
    data, mixture, _ = hostile
    build_indexes(mixture, MAX_LENGTH, BACKEND)
    os.remove(data / "a.png")
    loader = build_loader(mixture, MAX_LENGTH, BACKEND, num_workers=0)
    with caplog.at_level("DEBUG", logger="longvl.eagle.data"):
        batches = list(loader)
    assert batches and all(is_empty_pack(batch) for batch in batches)
    assert all(batch.stats.docs == 0 and float(batch.loss_weights.sum()) == 0 for batch in batches)
    assert loader.summary() == (f"bad samples: {len(BAD_LINES)} (malformed {len(BAD_LINES)}) excluded by the index, "
                                f"{len(BAD_LINES)} (missing_file {len(BAD_LINES)}) skipped while loading, "
                                f"{len(batches)} packs without a usable document")
    assert [r.getMessage() for r in caplog.records] == [f"epoch done; {loader.summary()}"]
    rows = [json.loads(line) for line in open(loader.write_bad_samples(str(tmp_path / "m" / "bad.jsonl")))]
    assert [row["when"] for row in rows] == ["index"] * len(BAD_LINES) + ["load"] * len(BAD_LINES)
    assert {row["file"] for row in rows} == {str(data / "records.jsonl")}
    assert all(row["position"].startswith("byte ") for row in rows if row["when"] == "load")
    real = collate_pack(PackDataset([DatasetSource("records", str(data / "records.jsonl"), str(data))], BACKEND,
                                    MAX_LENGTH)[PackRequest((), {})], image_token_id=1, tokens_per_tile=1)
    assert is_empty_pack(real)


# ------------------------------------------------------------------ security: the backend is data, not code
class NotABackend:
    """Has plan and process, but is no ProcessorBackend: must never be instantiated."""

    created = []

    def __init__(self, **kwargs):
        NotABackend.created.append(kwargs)

    def plan(self, record, max_length):
        return {}

    def process(self, record, max_length, video_meta):
        return {}


class Custom(ProcessorBackend):
    def __init__(self, marker):
        self.marker = marker

    def plan(self, record, max_length):
        return {}

    def process(self, record, max_length, video_meta):
        return {}


@pytest.mark.parametrize("factory, kwargs", [
    ("subprocess:run", lambda marker: {"args": ["touch", marker]}),
    ("os:system", lambda marker: {"command": f"touch {marker}"}),
    ("subprocess:check_call", lambda marker: {"args": f"touch {marker}", "shell": True}),
    ("tests.test_reliability_data:NotABackend", lambda marker: {"marker": marker}),
    ("numpy:save", lambda marker: {"file": marker, "arr": [1]}),
])
def test_backend_flags_accept_only_processor_backends(hostile, tmp_path, capsys, factory, kwargs):
    _, mixture, _ = hostile
    marker = str(tmp_path / "ran")
    spec = BackendSpec(factory, kwargs(marker))
    with pytest.raises(BackendError, match="standard-library module|not a subclass"):
        spec.build()
    with pytest.raises(BackendError):
        build_indexes(mixture, MAX_LENGTH, spec)
    with pytest.raises(BackendError):
        build_loader(mixture, MAX_LENGTH, spec, num_workers=0)
    with pytest.raises(SystemExit):
        index_main(["--data", mixture, "--max-length", "64", "--workers", "0", "--backend", factory,
                    "--backend-kwargs", json.dumps(kwargs(marker))])
    assert "--backend" in capsys.readouterr().err
    assert not os.path.exists(marker) and NotABackend.created == []
    assert not os.path.isdir(os.path.dirname(index_path(load_mixture(mixture).datasets[0], 64)))


def test_backend_resolution_imports_no_standard_library_module():
    sys.modules.pop("this", None)
    with pytest.raises(BackendError, match="standard-library"):
        BackendSpec("this:s").build()  # importing `this` prints; it is never imported
    assert "this" not in sys.modules
    with pytest.raises(BackendError, match="must look like"):
        BackendSpec("longvl.eagle.data.eagle_backend:EagleBackend()").build()
    with pytest.raises(BackendError, match="JSON object"):
        BackendSpec(kwargs=["not", "a", "mapping"])
    assert BackendSpec("tests.test_reliability_data:Custom", {"marker": "m"}).build().marker == "m"


# ------------------------------------------------------------------ security: where the index is written
def _files(folder):
    return {os.path.join(root, name) for root, _, names in os.walk(folder) for name in names}


def test_index_is_written_inside_the_data_folder_or_the_named_cache(tmp_path):
    """The annotation lies outside the data folder and the dataset is named to climb out of it: the index still
    goes to <data>/.longvl-index/, or only to the cache folder named."""
    data, shared, cache = tmp_path / "data", tmp_path / "shared", tmp_path / "cache"
    data.mkdir()
    shared.mkdir()
    Image.new("RGB", (64, 48)).save(data / "a.png")
    (shared / "records.jsonl").write_bytes(b"\n".join(_good(n) for n in range(3)) + b"\n")
    mixture = _write_mixture(data, [{"name": "../../escape", "annotation": "../shared/records.jsonl", "root": "."}])
    outside = _files(tmp_path) - _files(data)
    report = build_indexes(mixture, MAX_LENGTH, BACKEND)
    assert _files(tmp_path) - _files(data) == outside
    written = report["datasets"]["../../escape"]["index"]
    assert os.path.dirname(written) == str(data / ".longvl-index") and written in _files(data)
    assert index_is_current(mixture, MAX_LENGTH, BACKEND) and not index_is_current(mixture, 512, BACKEND)
    assert len(load_index(load_mixture(mixture).datasets[0], MAX_LENGTH, BACKEND).records) == 3

    inside = _files(data)
    index_main(["--data", mixture, "--max-length", "512", "--workers", "0", "--backend", BACKEND.factory,
                "--backend-kwargs", json.dumps(OPTIONS), "--cache-dir", str(cache)])
    assert _files(data) == inside and _files(tmp_path) - _files(data) - _files(cache) == outside
    assert index_is_current(mixture, 512, BACKEND, cache_dir=str(cache))
    assert len(list(build_loader(mixture, 512, BACKEND, num_workers=0, cache_dir=str(cache)))) > 0

    shutil.rmtree(data / ".longvl-index")
    os.symlink(shared, data / ".longvl-index")  # a planted symlink out of the data folder
    with pytest.raises(ValueError, match="symlink"):
        build_indexes(mixture, MAX_LENGTH, BACKEND)
    assert _files(shared) == {str(shared / "records.jsonl")}


# ------------------------------------------------------------------ the demo's generated data
def test_demo_data_fits_every_demo_stage(tmp_path):
    """Only the deliberately broken records (one or two of each kind) are dropped, at every stage of the demo."""
    from longvl.eagle.configuration_eagle import tiny_eagle_config
    config_path = os.path.join(os.path.dirname(__file__), "..", "longvl", "eagle", "configs", "demo.yaml")
    with open(config_path, encoding="utf-8") as handle:
        demo = yaml.safe_load(handle)
    model = tiny_eagle_config(600, 599)
    summary = generate(str(tmp_path), num=demo["data"]["num_samples"], seed=demo["seed"])
    for stage in demo["stages"]:
        spec = BackendSpec(kwargs={"tile_size": model.force_image_size, "tokens_per_tile": model.tokens_per_tile,
                                   "max_frames": stage["max_frames"], "min_frames": min(8, stage["max_frames"]),
                                   "max_tiles": stage.get("max_tiles", 12)})
        report = build_indexes(str(tmp_path / "mixture.yaml"), stage["max_length"], spec)
        counts = report["bad_samples"]["by_reason"]
        assert report["bad_samples"]["total"] == summary["broken"], (stage["name"], counts)
        assert counts["too_long"] == 1 and set(counts.values()) <= {1, 2}, (stage["name"], counts)
        ids = {event.id for event in report["bad_sample_log"].events}
        assert "tx-control-text" not in ids and "bad-too-long" in ids
    result = subprocess.run([sys.executable, "-m", "longvl.eagle.data.synthetic", "--out", str(tmp_path / "cli"),
                             "--num", "8"], capture_output=True, text=True, timeout=300, check=True)
    assert result.stderr == ""
