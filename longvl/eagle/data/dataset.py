"""The worker side: turn a `PackRequest` into processed documents, skipping the ones that fail.

Each document is read with one seek (JSONL) or from a per-worker copy of the list (JSON), validated,
and processed through the backend under a timeout; reading and parsing are guarded like processing. A
failing document is left out of the pack and reported as a `BadSampleEvent`; the pack still comes back,
so a bad sample never stops or stalls the loader.
"""
import time
from dataclasses import dataclass

from .bad_samples import BadSample, BadSampleEvent, guarded_call
from .records import load_json_list, parse_raw, read_jsonl_line


@dataclass(frozen=True)
class DatasetSource:
    name: str
    annotation: str
    root: str


@dataclass
class ProcessedPack:
    docs: list  # backend process() dicts, each with "dataset" and "id" added
    bad_samples: list  # BadSampleEvent of every document left out
    state: dict  # sampler state after this pack
    seconds: float  # time spent reading and processing in the worker


class PackDataset:
    """Map-style dataset indexed by `PackRequest`s (use with `PackSampler` and batch_size=None)."""

    def __init__(self, sources, backend_spec, max_length, timeout_s=60.0):
        self.sources = sources
        self.backend_spec = backend_spec
        self.max_length = max_length
        self.timeout_s = timeout_s
        self._backend = None  # built lazily inside each worker process
        self._json_lists = {}

    def __getstate__(self):
        return dict(self.__dict__, _backend=None, _json_lists={})

    def _raw(self, doc):
        source = self.sources[doc.dataset]
        if doc.offset >= 0:
            return read_jsonl_line(source.annotation, doc.offset)
        if doc.dataset not in self._json_lists:
            self._json_lists[doc.dataset] = load_json_list(source.annotation)
        return self._json_lists[doc.dataset][doc.record]

    def _read(self, doc, fallback_id):
        return parse_raw(self._raw(doc), self.sources[doc.dataset].root, fallback_id)

    def _process(self, record, doc, budget):
        sample = guarded_call(self.timeout_s, self._backend.process, record, self.max_length, doc.video_meta)
        length = len(sample["input_ids"])
        if length > budget:
            raise BadSample("length_mismatch", f"processed to {length} tokens, planned {doc.length}, "
                                               f"{budget} left in the pack")
        return sample

    def __getitem__(self, request):
        start = time.perf_counter()
        if self._backend is None:
            self._backend = self.backend_spec.build()
        docs, events = [], []
        budget = self.max_length
        for doc in request.docs:
            source = self.sources[doc.dataset]
            record_id = f"{source.name}:{doc.record}"
            try:
                record = guarded_call(None, self._read, doc, record_id)
                record_id = record.id
                sample = self._process(record, doc, budget)
            except BadSample as bad:
                where = f"entry {doc.record}" if doc.offset < 0 else f"byte {doc.offset}"
                events.append(BadSampleEvent.from_error(bad, source.name, record_id, source.annotation, where))
                continue
            budget -= len(sample["input_ids"])
            docs.append(dict(sample, dataset=source.name, id=record_id))
        return ProcessedPack(docs, events, request.state, time.perf_counter() - start)
