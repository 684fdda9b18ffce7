"""Bad samples: one exception type, a guarded call with a timeout, and a log that counts and summarises.

Real data always holds some broken records. A training run must skip them, say which ones (by record id)
and why, and never hang on a media file that makes a decoder spin -- so every per-sample call goes through
`guarded_call`, and every skip through a `BadSampleLog`.
"""
import logging
from collections import Counter

from longvl.eagle.timeouts import run_with_timeout

logger = logging.getLogger("longvl.eagle.data")


class BadSample(Exception):
    """A sample that cannot be trained on; `reason` is a short category used for counting."""

    REASONS = ("malformed", "missing_file", "path_escape", "corrupt_media", "too_long", "timeout",
               "length_mismatch", "process_error")

    def __init__(self, reason, detail):
        if reason not in self.REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; expected one of {self.REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.record_id = None  # filled in once the record's own id is known


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
    and goes on with the next sample instead of hanging the whole loader.
    """
    try:
        return run_with_timeout(lambda: fn(*args), timeout_s,
                                lambda: BadSample("timeout", f"no result after {timeout_s:.0f} s"),
                                name="eagle-data-guarded-call")
    except BadSample:
        raise
    except Exception as error:  # noqa: BLE001 -- every sample failure is reported as a BadSample
        raise as_bad_sample(error) from error


class BadSampleLog:
    """Counts skipped samples by reason and dataset and keeps every event; callers print one summary line."""

    def __init__(self, examples_per_reason=5):
        self.events = []   # every skip, {dataset, id, reason, detail}, for the run's bad-sample file
        self.by_reason = Counter()
        self.by_dataset = Counter()
        self.examples = {}
        self.examples_per_reason = examples_per_reason

    def add(self, dataset, record_id, reason, detail):
        self.by_reason[reason] += 1
        self.by_dataset[dataset] += 1
        self.events.append({"dataset": dataset, "id": record_id, "reason": reason, "detail": detail})
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.examples_per_reason:
            kept.append({"dataset": dataset, "id": record_id, "detail": detail})
        logger.debug("skipping bad sample %s/%s (%s): %s", dataset, record_id, reason, detail)

    def add_event(self, event):
        """Record an event dict as produced in a worker: {dataset, id, reason, detail}."""
        self.add(event["dataset"], event["id"], event["reason"], event["detail"])

    @property
    def total(self):
        return sum(self.by_reason.values())

    def as_dict(self):
        return {"total": self.total, "by_reason": dict(self.by_reason), "by_dataset": dict(self.by_dataset),
                "examples": self.examples}

    def summary(self):
        if not self.total:
            return "bad samples: none"
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.by_reason.most_common())
        datasets = ", ".join(f"{name} {count}" for name, count in self.by_dataset.most_common())
        return f"bad samples: {self.total} ({reasons}); by dataset: {datasets}"
