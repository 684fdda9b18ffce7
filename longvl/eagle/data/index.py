"""Offline index: every sample's planned token length and video metadata, computed once, in parallel.

Packing a 128K-token stage needs each sample's length after tiling and degrade sampling; getting it by
decoding media at train time would cost more than the training step. This step asks the processor for a
plan (image headers and container metadata only), once per (dataset, max length), and writes it inside the
data folder (`<mixture folder>/.longvl-index/`) or a cache folder the user names (`--cache-dir`), as
`<dataset>-<hash>.index-L<max_length>.jsonl`: a header line, then one row per record with its line (JSONL)
and byte offset, length, image / frame / tile counts and video metadata -- or the reason it is unusable.
A bad record (whatever shape of broken JSON) becomes such a row; an annotation file that is unusable as a
whole stops the index with an error naming the file and the position.

    python -m longvl.eagle.data.index --data DIR/mixture.yaml --max-length 32768 --workers 8 [--cache-dir C]
"""
import argparse
import json
import multiprocessing
import os
import secrets
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .backend import BackendError, BackendSpec, check_plan
from .bad_samples import BadSample, BadSampleEvent, BadSampleLog, guarded_call
from .mixture import load_mixture
from .records import load_json_list, parse_raw, scan_annotation

INDEX_FORMAT = "eagle-data-index/2"
_CHUNK = 64  # records per worker task: large enough to amortise pickling, small enough to balance
_FINGERPRINT_BYTES = 1 << 20


def index_path(spec, max_length):
    """The index file of a mixture dataset (a DatasetSpec from load_mixture) for one max length."""
    if spec.index_stem is None:
        raise ValueError(f"dataset {spec.name!r} has no index location: read it with load_mixture()")
    return f"{spec.index_stem}.index-L{max_length}.jsonl"


def fingerprint(path):
    """Size plus a checksum of the first and last MiB: catches an edited annotation file without reading it all."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(_FINGERPRINT_BYTES)
        handle.seek(max(0, size - _FINGERPRINT_BYTES))
        tail = handle.read()
    return f"{size}:{zlib.crc32(head):08x}:{zlib.crc32(tail):08x}"


def row_position(row):
    """Where a row's record is, for people: "line 12" of a JSONL file, "entry 3" of a JSON list."""
    return f"entry {row['i']}" if row["line"] is None else f"line {row['line']}"


# ---------------------------------------------------------------- worker side
_backend = None


def _init_worker(backend_spec):
    global _backend
    _backend = backend_spec.build()


def _started(_):
    return os.getpid()


def _plan_record(backend, raw, root, fallback_id, max_length, timeout_s):
    """Parse and plan one record; returns an index row (ok or not), never raises for a bad sample.

    Parsing runs guarded like planning: whatever the JSON holds, the record becomes a row, never a crash."""
    record_id = fallback_id
    try:
        record = guarded_call(None, parse_raw, raw, root, fallback_id)
        record_id = record.id
        plan = check_plan(guarded_call(timeout_s, backend.plan, record, max_length), record_id)
        if plan["length"] > max_length:
            raise BadSample("too_long", f"{plan['length']} tokens after degrading > max length {max_length}")
        return {"id": record_id, "ok": True, **plan}
    except BadSample as bad:
        return {"id": bad.record_id or record_id, "ok": False, "reason": bad.reason, "detail": bad.detail}


def _plan_chunk(task):
    name, annotation, root, items, max_length, timeout_s = task
    rows = []
    with open(annotation, "rb") as handle:
        for record_index, line, offset, obj in items:
            if offset is not None:
                handle.seek(offset)
                obj = handle.readline()
            row = _plan_record(_backend, obj, root, f"{name}:{record_index}", max_length, timeout_s)
            rows.append({"i": record_index, "line": line, "offset": offset, **row})
    return rows


# ---------------------------------------------------------------- main side
def _tasks(spec, max_length, timeout_s):
    lines = scan_annotation(spec.annotation)
    if lines is None:
        items = [(i, None, None, obj) for i, obj in enumerate(load_json_list(spec.annotation))]
    else:
        items = [(i, line, offset, None) for i, (line, offset) in enumerate(lines)]
    return [(spec.name, spec.annotation, spec.root, items[start:start + _CHUNK], max_length, timeout_s)
            for start in range(0, len(items), _CHUNK)]


def _index_folder(spec):
    """The folder of the dataset's index files, created if needed; a symlink planted there is refused."""
    folder = os.path.dirname(spec.index_stem)
    if os.path.islink(folder):
        raise ValueError(f"index folder {folder} is a symlink: refusing to write through it (remove it, or "
                         "name a cache folder)")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OSError(error.errno, f"cannot create the index folder {folder} ({error.strerror}): name a writable "
                                   "cache folder (--cache-dir / cache_dir=)") from error
    return folder


def _write_index(spec, max_length, backend_spec, rows, seconds):
    rows.sort(key=lambda row: row["i"])
    header = {"format": INDEX_FORMAT, "dataset": spec.name, "annotation": os.path.basename(spec.annotation),
              "fingerprint": fingerprint(spec.annotation), "max_length": max_length,
              "backend": backend_spec.factory, "backend_kwargs": backend_spec.kwargs,
              "records": len(rows), "usable": sum(row["ok"] for row in rows), "seconds": round(seconds, 3)}
    path = index_path(spec, max_length)
    temporary = os.path.join(_index_folder(spec), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # A new file (O_EXCL: never an existing path or a planted symlink), renamed into place: readers never
    # see a half-written index.
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as handle:
        handle.write(json.dumps(header) + "\n")
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(temporary, path)
    return path


def _excluded(spec, rows):
    return [BadSampleEvent(spec.name, row["id"], row["reason"], row["detail"], spec.annotation, row_position(row))
            for row in rows if not row["ok"]]


def build_indexes(mixture_path, max_length, backend_spec=None, workers=0, timeout_s=60.0, cache_dir=None):
    """Index every dataset of a mixture; returns a report dict (paths, counts, throughput, bad samples).

    workers=0 plans in this process (tests, tiny data); otherwise a spawn pool of `workers` processes.
    Index files go inside the mixture's folder, or into `cache_dir` when given. The report's
    "bad_sample_log" (a BadSampleLog) holds every excluded record with its file, position and reason.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    backend_spec = (backend_spec or BackendSpec()).check()  # refused here, before any process starts
    mixture = load_mixture(mixture_path, cache_dir)
    log = BadSampleLog()
    report = {"max_length": max_length, "datasets": {}, "records": 0}
    start = time.perf_counter()
    pool = None
    if workers > 0:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(backend_spec,))
        list(pool.map(_started, range(workers)))  # start the workers now: keeps startup out of the throughput
    else:
        _init_worker(backend_spec)
    try:
        for spec in mixture.datasets:
            dataset_start = time.perf_counter()
            tasks = _tasks(spec, max_length, timeout_s)
            chunks = pool.map(_plan_chunk, tasks) if pool else map(_plan_chunk, tasks)
            rows = [row for chunk in chunks for row in chunk]
            seconds = time.perf_counter() - dataset_start
            path = _write_index(spec, max_length, backend_spec, rows, seconds)
            for event in _excluded(spec, rows):
                log.add(event)
            report["datasets"][spec.name] = {"index": path, "records": len(rows),
                                             "usable": sum(row["ok"] for row in rows),
                                             "degraded": sum(bool(row.get("degraded")) for row in rows),
                                             "seconds": round(seconds, 3)}
            report["records"] += len(rows)
    finally:
        if pool:
            pool.shutdown()
    report["seconds"] = time.perf_counter() - start
    planning = sum(info["seconds"] for info in report["datasets"].values())
    report["startup_seconds"] = report["seconds"] - planning  # pool start, imports, tokenizer
    report["samples_per_second"] = report["records"] / max(planning, 1e-9)
    report["bad_samples"] = log.as_dict()
    report["bad_summary"] = log.summary()
    report["bad_sample_log"] = log
    return report


@dataclass
class DatasetIndex:
    """The usable part of one dataset's index, as arrays the sampler can pack from."""

    name: str
    annotation: str
    root: str
    records: np.ndarray  # record number in the annotation file, per usable sample
    offsets: np.ndarray  # byte offset of the JSONL line, -1 for JSON-list files
    lengths: np.ndarray
    images: np.ndarray
    frames: np.ndarray
    video_meta: dict  # record number -> list of per-video metadata (only records with videos)
    excluded: list = field(default_factory=list)  # BadSampleEvent of every record the index marked unusable


def _rebuild_command(max_length):
    return f"python -m longvl.eagle.data.index --data <mixture> --max-length {max_length}"


def _read_header(spec, max_length, backend_spec, handle, path):
    """The index header, or ValueError saying why the index cannot be used (stale, other length or settings)."""
    command = _rebuild_command(max_length)
    try:
        header = json.loads(handle.readline())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a readable index; rerun: {command}") from None
    if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT or header.get("max_length") != max_length:
        raise ValueError(f"{path} is not a {INDEX_FORMAT} index for max length {max_length}; rerun: {command}")
    if header["fingerprint"] != fingerprint(spec.annotation):
        raise ValueError(f"{path} is stale: {spec.annotation} changed since indexing; rerun: {command}")
    if backend_spec is not None and (header["backend"], header["backend_kwargs"]) != (
            backend_spec.factory, json.loads(json.dumps(backend_spec.kwargs))):
        raise ValueError(f"{path} was planned by {header['backend']} {header['backend_kwargs']}, not by "
                         f"{backend_spec.factory} {backend_spec.kwargs}; rerun: {command}")
    return header


def load_index(spec, max_length, backend_spec=None):
    """Read the index of one mixture dataset; refuses a missing, stale or foreign-length index, and with
    `backend_spec` one planned by other processor settings (its lengths would not match the samples)."""
    path = index_path(spec, max_length)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no index for dataset {spec.name!r} at {path}; build it with: "
                                f"{_rebuild_command(max_length)}")
    with open(path, encoding="utf-8") as handle:
        _read_header(spec, max_length, backend_spec, handle, path)
        rows = [json.loads(line) for line in handle]
    good = [row for row in rows if row["ok"]]

    def column(key):
        return np.asarray([row[key] for row in good], dtype=np.int64)

    return DatasetIndex(
        name=spec.name, annotation=spec.annotation, root=spec.root,
        records=column("i"),
        offsets=np.asarray([-1 if row["offset"] is None else row["offset"] for row in good], dtype=np.int64),
        lengths=column("length"), images=column("images"), frames=column("frames"),
        video_meta={row["i"]: row["video_meta"] for row in good if row["video_meta"]},
        excluded=_excluded(spec, rows),
    )


def index_is_current(mixture_path, max_length, backend_spec, cache_dir=None):
    """Whether every dataset of the mixture has a usable index for this max length and these processor
    settings (what load_index would accept); False means: run build_indexes first."""
    for spec in load_mixture(mixture_path, cache_dir).datasets:
        path = index_path(spec, max_length)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as handle:
            try:
                _read_header(spec, max_length, backend_spec, handle, path)
            except ValueError:
                return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="mixture file (.yaml or InternVL meta .json)")
    parser.add_argument("--max-length", type=int, required=True, help="stage max sequence length in tokens")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="0 = plan in this process")
    parser.add_argument("--backend", default=BackendSpec().factory,
                        help="processor backend 'package.module:Class', a ProcessorBackend subclass")
    parser.add_argument("--backend-kwargs", default="{}", help="JSON object of keyword arguments for the backend")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per sample before it is skipped")
    parser.add_argument("--cache-dir", default=None,
                        help="folder for the index files (default: .longvl-index/ in the mixture's folder)")
    args = parser.parse_args(argv)
    try:
        spec = BackendSpec(args.backend, json.loads(args.backend_kwargs)).check()
    except (BackendError, json.JSONDecodeError) as error:
        parser.error(f"--backend / --backend-kwargs: {error}")
    report = build_indexes(args.data, args.max_length, spec, args.workers, args.timeout, args.cache_dir)
    for name, info in report["datasets"].items():
        print(f"{name}: {info['usable']}/{info['records']} usable, {info['degraded']} degraded, "
              f"{info['seconds']:.2f} s -> {info['index']}")
    print(f"indexed {report['records']} records in {report['seconds']:.2f} s: "
          f"{report['samples_per_second']:.1f} samples/s with {args.workers} workers "
          f"after {report['startup_seconds']:.2f} s of startup")
    if report["bad_samples"]["total"]:
        print(f"{report['bad_summary']} -- each with its file, line and reason in the index files' rows "
              '"ok": false')
    else:
        print(report["bad_summary"])
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
