"""Run a call under a time limit without being able to hang on it.

Decoders stuck in native code cannot be interrupted, so the call runs in a daemon thread and the caller walks
away after the limit (the stuck thread never blocks interpreter exit). Standard library only: data workers
and record parsing import this without paying for the processing stack.
"""
import threading


def run_with_timeout(fn, timeout_s: float, timeout_error, name: str = "eagle-timeout"):
    """fn()'s result, or fn()'s own exception re-raised here, or `timeout_error()` raised after timeout_s."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as error:  # handed to the caller's thread
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True, name=name)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise timeout_error()
    if "error" in box:
        raise box["error"]
    return box["result"]
