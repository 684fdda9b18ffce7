"""The narrow interface between the data pipeline and the processor that turns a record into tokens.

The pipeline needs two things from a processor: `plan(record, max_length)` -- the token length a record
will have after tiling and degrade sampling, computed from image headers and video metadata only -- and
`process(record, max_length, video_meta)` -- the actual tokens, labels and pixels. A processor backend is a
subclass of `ProcessorBackend`. Worker processes are started with spawn, so a backend travels as a
`BackendSpec` (the class's import path plus JSON keyword arguments) and is built inside each worker.

The import path comes from command lines and config files, so it is data, not code: `BackendSpec.build`
refuses anything that is not a `ProcessorBackend` subclass before calling anything (`subprocess:run` or
`os:system` never run), and never imports a standard-library module to find out.

plan() returns a dict with
    length (int, total tokens), images (int), frames (int), tiles (int, vision tiles incl. frames),
    degraded (str, "" when nothing was degraded), video_meta (list of JSON-able dicts, one per video).
process() returns a dict with
    input_ids (LongTensor (n,)), labels (LongTensor (n,), aligned with input_ids, -100 = not supervised),
    pixel_values (FloatTensor (tiles, 3, s, s)), num_tiles (list of ints, one per image or frame, in
    prompt order), frames (int, how many of those items are video frames), degraded (str).
Either raises (any exception) for a sample that cannot be used; the pipeline maps it to a BadSample.
"""
import abc
import importlib
import sys
from dataclasses import dataclass, field

DEFAULT_FACTORY = "longvl.eagle.data.eagle_backend:EagleBackend"


class ProcessorBackend(abc.ABC):
    """What a processor must offer the data pipeline; subclass it to plug in another processor."""

    @abc.abstractmethod
    def plan(self, record, max_length):
        """Planned token length and media counts of a `Record` (see the module docstring), no pixel decoded."""

    @abc.abstractmethod
    def process(self, record, max_length, video_meta):
        """Tokens, labels and pixels of a `Record` (see the module docstring)."""


class BackendError(ValueError):
    """A backend import path that does not name a ProcessorBackend subclass."""


def resolve_backend(factory):
    """The `ProcessorBackend` subclass named by "package.module:Class"; nothing is called on the way."""
    if not isinstance(factory, str):
        raise BackendError(f"backend must be a 'package.module:Class' string, got {type(factory).__name__}")
    module_name, sep, attr = factory.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise BackendError(f"backend must look like 'package.module:Class', got {factory!r}")
    if module_name.partition(".")[0] in sys.stdlib_module_names:
        raise BackendError(f"backend {factory!r} names a standard-library module: a backend is a "
                           f"{ProcessorBackend.__name__} subclass, e.g. {DEFAULT_FACTORY!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise BackendError(f"cannot import the module of backend {factory!r}: {error}") from error
    backend_class = getattr(module, attr, None)
    if not (isinstance(backend_class, type) and issubclass(backend_class, ProcessorBackend)):
        raise BackendError(f"backend {factory!r} is not a subclass of {__name__}.{ProcessorBackend.__name__} "
                           f"(got {type(backend_class).__name__}); only processor backends are accepted")
    return backend_class


@dataclass(frozen=True)
class BackendSpec:
    factory: str = DEFAULT_FACTORY  # "package.module:Class", a ProcessorBackend subclass
    kwargs: dict = field(default_factory=dict)  # JSON-able keyword arguments of the class

    def __post_init__(self):
        if not isinstance(self.kwargs, dict) or not all(isinstance(key, str) for key in self.kwargs):
            raise BackendError(f"backend keyword arguments must be a JSON object, got {self.kwargs!r:.80}")

    def check(self):
        """Refuse a spec that does not name a processor backend, without building it."""
        resolve_backend(self.factory)
        return self

    def build(self):
        return resolve_backend(self.factory)(**self.kwargs)


PLAN_KEYS = ("length", "images", "frames", "tiles", "degraded", "video_meta")


def check_plan(plan, record_id):
    """Refuse a plan that lacks fields: a silent default here would corrupt every packing decision."""
    missing = [key for key in PLAN_KEYS if key not in plan]
    if missing:
        raise ValueError(f"backend plan for record {record_id!r} lacks {missing}")
    return {key: plan[key] for key in PLAN_KEYS}
