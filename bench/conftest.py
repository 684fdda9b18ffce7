"""Benchmark fixtures: `measure` times one provider of one op and records it; results go to one JSON.

Each bench test calls `measure(op, provider, fn, shape=..., dtype=..., bytes=..., flops=...)`. The record
holds the CUDA-event median, the achieved TB/s or TFLOP/s against the ceilings measured in the same session,
the peak extra memory and, where the bench gives one, the result's error against float64 (`rel_error`).
pytest-benchmark runs underneath (its JSON with `--benchmark-json`), with our CUDA-event figures in each
benchmark's extra_info. On GPU the session's records land in bench/results/ (or $BENCH_OUT); on CPU they go
nowhere unless BENCH_OUT is set, since they are not performance figures.
"""
import dataclasses
import os

import pytest

from bench.harness import ON_GPU, Record, device_ceilings, median_ms, peak_extra_mib, save_results

_RECORDS: list[Record] = []
_CEILINGS: dict = {}


@pytest.fixture(scope="session")
def ceilings():
    _CEILINGS.update(device_ceilings())
    return _CEILINGS


@pytest.fixture
def measure(benchmark, ceilings):
    def _measure(op, provider, fn, *, shape, dtype, bytes=None, flops=None, memory=True, note="",
                 cuda_graph=False, rel_error=None):
        timing = "cuda_events" if ON_GPU else "wall_clock"
        if ON_GPU and cuda_graph:
            try:
                ms, timing = median_ms(fn, cuda_graph=True), "cuda_graph"
            except Exception as err:
                # A failed capture can leave CUDA state (the RNG's capture flag) unusable for the tests that
                # follow, so the record fails loudly instead of falling back to another timing.
                pytest.fail(f"{op}/{provider}: CUDA graph capture failed: {type(err).__name__}: {err}")
        else:
            ms = median_ms(fn)
        rec = Record(op=op, provider=provider, shape=dict(shape), dtype=str(dtype).replace("torch.", ""),
                     median_ms=ms, device="gpu" if ON_GPU else "cpu", timing=timing, note=note,
                     rel_error=rel_error)
        if bytes is not None:
            rec.metric, rec.value = "TB/s", bytes / ms / 1e9
            if ceilings:
                rec.fraction_of_ceiling = rec.value / ceilings["copy_tb_s"]
        elif flops is not None:
            rec.metric, rec.value = "TFLOP/s", flops / ms / 1e9
            if ceilings:
                rec.fraction_of_ceiling = rec.value / ceilings["bf16_gemm_tflop_s"]
        if memory:
            rec.peak_extra_mib = peak_extra_mib(fn)
        benchmark.extra_info.update(dataclasses.asdict(rec))
        benchmark.pedantic(fn, rounds=1, iterations=1)
        _RECORDS.append(rec)
        return rec

    return _measure


def pytest_sessionfinish(session, exitstatus):
    if _RECORDS and (ON_GPU or os.environ.get("BENCH_OUT")):
        path = save_results(_RECORDS, _CEILINGS, os.environ.get("BENCH_NAME", "bench"))
        if path is not None:
            print(f"\nbenchmark results: {path}")
