"""Bad samples: one exception type, a guarded call with a timeout, and a log that counts and summarises.

Real data always holds some broken records. A training run must skip them, say which ones (file, position,
record id) and why, and never hang on a media file that makes a decoder spin -- so every per-sample call
goes through `guarded_call`, and every skip becomes a `BadSampleEvent` in a `BadSampleLog`. The log is for
people: one summary line with counts by reason, and every event in a details file (`write_details`), never
one log line per sample.
"""
import dataclasses
import json
import os
import secrets
from collections import Counter

from longvl.eagle.timeouts import run_with_timeout


class BadSample(Exception):
    """A sample that cannot be trained on; `reason` is a short category used for counting."""

    REASONS = ("malformed", "missing_file", "path_escape", "corrupt_media", "image_too_large", "too_long",
               "timeout", "length_mismatch", "process_error")

    def __init__(self, reason, detail):
        if reason not in self.REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; expected one of {self.REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.record_id = None  # filled in once the record's own id is known


@dataclasses.dataclass(frozen=True)
class BadSampleEvent:
    """One skipped sample: where it is, what it is called, and why it was skipped."""

    dataset: str
    id: str  # the record's own id, or "<dataset>:<record number>" when it has none or cannot be parsed
    reason: str  # one of BadSample.REASONS
    detail: str
    file: str  # the annotation file
    position: str  # "line 12" (JSONL, found by the index), "entry 3" (JSON list), "byte 4096" (JSONL, at load)

    @classmethod
    def from_error(cls, bad, dataset, fallback_id, file, position):
        return cls(dataset, bad.record_id or fallback_id, bad.reason, bad.detail, file, position)


def as_bad_sample(error):
    """Map an exception raised while reading or processing a sample onto a BadSample category."""
    if isinstance(error, BadSample):
        return error
    if isinstance(error, FileNotFoundError):
        return BadSample("missing_file", str(error))
    if isinstance(error, OSError) or type(error).__name__ in ("DECORDError", "UnidentifiedImageError", "error"):
        # PIL raises OSError subclasses, decord DECORDError, OpenCV cv2.error on unreadable media.
        return BadSample("corrupt_media", f"{type(error).__name__}: {error}")
    return BadSample("process_error", f"{type(error).__name__}: {error}")


def guarded_call(timeout_s, fn, *args):
    """Run fn(*args); any failure becomes a BadSample, and so does running longer than timeout_s.

    A decoder stuck in C code cannot be interrupted, but the worker walks away from it (`run_with_timeout`)
    and goes on with the next sample instead of hanging the whole loader. With timeout_s=None fn runs in
    this thread (record parsing: pure Python that cannot hang, and a thread per record would cost more).
    """
    try:
        if timeout_s is None:
            return fn(*args)
        return run_with_timeout(lambda: fn(*args), timeout_s,
                                lambda: BadSample("timeout", f"no result after {timeout_s:.0f} s"),
                                name="eagle-data-guarded-call")
    except BadSample:
        raise
    except Exception as error:  # noqa: BLE001 -- every sample failure is reported as a BadSample
        raise as_bad_sample(error) from error


class BadSampleLog:
    """Every skipped sample of a stage: counts by reason and dataset, and the events themselves."""

    def __init__(self):
        self.by_reason = Counter()
        self.by_dataset = Counter()
        self.events = []

    def add(self, event):
        self.by_reason[event.reason] += 1
        self.by_dataset[event.dataset] += 1
        self.events.append(event)

    @property
    def total(self):
        return sum(self.by_reason.values())

    def as_dict(self):
        return {"total": self.total, "by_reason": dict(self.by_reason), "by_dataset": dict(self.by_dataset)}

    def counts(self):
        """"6 (corrupt_media 2, missing_file 1, ...)": the total and the counts by reason, most frequent first."""
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.by_reason.most_common())
        return f"{self.total} ({reasons})" if self.total else "0"

    def summary(self):
        if not self.total:
            return "bad samples: none"
        datasets = ", ".join(f"{name} {count}" for name, count in self.by_dataset.most_common())
        return f"bad samples: {self.counts()}; by dataset: {datasets}"

    def details(self, when=None):
        """Every event as a JSON-able dict, with `when` ("index", "load", ...) first if given."""
        rows = [dataclasses.asdict(event) for event in self.events]
        return rows if when is None else [{"when": when, **row} for row in rows]


def write_details(path, rows):
    """Write bad-sample detail rows as JSON lines; returns path.

    Written to a new file and renamed into place: a reader never sees half a file, and an existing path
    (or a symlink planted there) is replaced, never written through.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    os.replace(temporary, path)
    return path
