"""The narrow interface between the data pipeline and the processor that turns a record into tokens.

The pipeline needs two things from a processor: `plan(record, max_length)` -- the token length a record
will have after tiling and degrade sampling, computed from image headers and video metadata only -- and
`process(record, max_length, video_meta)` -- the actual tokens, labels and pixels. Worker processes are
started with spawn, so a backend travels as a `BackendSpec` (an import path plus keyword arguments) and
is built inside each worker.

plan() returns a dict with
    length (int, total tokens), images (int), frames (int), tiles (int, vision tiles incl. frames),
    degraded (str, "" when nothing was degraded), video_meta (list of JSON-able dicts, one per video).
process() returns a dict with
    input_ids (LongTensor (n,)), labels (LongTensor (n,), aligned with input_ids, -100 = not supervised),
    pixel_values (FloatTensor (tiles, 3, s, s)), num_tiles (list of ints, one per image or frame, in
    prompt order), frames (int, how many of those items are video frames), degraded (str).
Either raises (any exception) for a sample that cannot be used; the pipeline maps it to a BadSample.
"""
import importlib
from dataclasses import dataclass, field

DEFAULT_FACTORY = "longvl.eagle.data.eagle_backend:EagleBackend"


@dataclass(frozen=True)
class BackendSpec:
    factory: str = DEFAULT_FACTORY  # "package.module:callable" returning an object with plan / process
    kwargs: dict = field(default_factory=dict)

    def build(self):
        module_name, sep, attr = self.factory.partition(":")
        if not sep or not attr:
            raise ValueError(f"backend factory must look like 'package.module:callable', got {self.factory!r}")
        factory = getattr(importlib.import_module(module_name), attr, None)
        if factory is None:
            raise ValueError(f"{module_name} has no attribute {attr!r} (backend factory {self.factory!r})")
        backend = factory(**self.kwargs)
        for method in ("plan", "process"):
            if not callable(getattr(backend, method, None)):
                raise TypeError(f"backend from {self.factory!r} has no {method}() method")
        return backend


PLAN_KEYS = ("length", "images", "frames", "tiles", "degraded", "video_meta")


def check_plan(plan, record_id):
    """Refuse a plan that lacks fields: a silent default here would corrupt every packing decision."""
    missing = [key for key in PLAN_KEYS if key not in plan]
    if missing:
        raise ValueError(f"backend plan for record {record_id!r} lacks {missing}")
    return {key: plan[key] for key in PLAN_KEYS}
