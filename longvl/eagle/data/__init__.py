"""Multimodal training data: LLaVA-style records, mixtures, offline index, balanced packing, resumable loading.

Commands:
    python -m longvl.eagle.data.synthetic --out DIR [--num N]          # small realistic dataset, incl. broken records
    python -m longvl.eagle.data.index --data DIR/mixture.yaml --max-length N --workers K   # once per stage length
                                                                # (index files: DIR/.longvl-index/ or --cache-dir)
    python -m longvl.eagle.data.loader --data DIR/mixture.yaml --max-length N --workers K --step-seconds S
                                                                # share of a step spent waiting for data

Use:
    loader = build_loader("DIR/mixture.yaml", max_length=32768, rank=r, world_size=w, num_workers=4,
                          image_token_id=IMG_CONTEXT_ID, tokens_per_tile=256)
    for batch in loader: ...                    # one epoch per loop; every rank gets the same number of steps
    state = loader.state_dict()                 # save with the checkpoint; resume with load_state_dict(state),
                                                # also with another world size; the cost does not grow with
                                                # the position (the epoch's pack plan is rebuilt from the
                                                # index, no sample is read again)
    print(loader.summary())                     # one line: bad samples excluded by the index and skipped
                                                # at load time, by reason; empty packs
    loader.write_bad_samples(path)              # every one of them with file, position, reason (JSON lines)
    if is_empty_pack(batch): ...                # every document of this pack failed: skip the optimizer
                                                # step, on every rank together

Each batch is ONE packed sequence of whole documents (batch size 1 per GPU): a `PackedBatch`
(longvl/eagle/data/batch.py documents every field once). Padding: with pad_to_multiple_of=m the pack is padded
to a multiple of m with pad_token_id, as its own trailing document with no supervision. A pack whose documents
all failed becomes a single padding document with zero weights (`is_empty_pack`): every rank still gets a
batch, and no rank may apply an update for it.
"""
import importlib

# Imported on first use (PEP 562): `python -m longvl.eagle.data.index` / `.loader` / `.synthetic` then run their module
# exactly once, and spawned workers do not import what they never use.
_EXPORTS = {
    "BadSample": "bad_samples", "BadSampleEvent": "bad_samples", "BadSampleLog": "bad_samples",
    "BackendSpec": "backend", "ProcessorBackend": "backend", "collate_pack": "collate",
    "build_indexes": "index", "index_is_current": "index", "load_index": "index",
    "ResumableLoader": "loader", "build_loader": "loader", "is_empty_pack": "loader",
    "sqrt_document_weights": "loss_weights", "supervised_counts": "loss_weights",
    "token_loss_weights": "loss_weights", "load_mixture": "mixture", "pack_documents": "packing",
    "parse_record": "records", "PackSampler": "sampler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
