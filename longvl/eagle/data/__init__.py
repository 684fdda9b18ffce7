"""Multimodal training data: LLaVA-style records, mixtures, offline index, balanced packing, resumable loading.

Commands:
    python -m longvl.eagle.data.synthetic --out DIR [--num N]          # small realistic dataset, incl. broken records
    python -m longvl.eagle.data.index --data DIR/mixture.yaml --max-length N --workers K   # once per stage length
                                                                # (index files: DIR/.longvl-index/ or --cache-dir)
    python -m longvl.eagle.data.loader --data DIR/mixture.yaml --max-length N --workers K --step-seconds S
                                                                # share of a step spent waiting for data

Use:
    loader = build_loader("DIR/mixture.yaml", max_length=32768, rank=r, world_size=w, num_workers=4)
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

Each batch is ONE packed sequence of whole documents (batch size 1 per GPU), a dict:
    input_ids      LongTensor (1, L): documents back to back; L <= max_length (+ padding, see below)
    labels         LongTensor (1, L): aligned with input_ids (NOT shifted); -100 where not supervised
    shift_labels   LongTensor (1, L): shifted inside each document: position t holds the token position t
                   predicts; -100 at every document's last position and in padding. Shard this one under
                   context parallelism (a shard has no right neighbour), and use it with loss_weights.
    loss_weights   FloatTensor (1, L): square-root averaged weights, aligned with shift_labels: each
                   supervised position of document i weighs 1 / (sqrt(n_i) * sum_j sqrt(n_j)); they add up
                   to 1 per pack, so loss = sum(weight * token CE). 0 where shift_labels is -100.
    position_ids   LongTensor (1, L): restart at 0 for every document (RoPE and attention never cross them)
    cu_seqlens     IntTensor (docs + 1,) int32: document boundaries, cu_seqlens[-1] == L
    max_seqlen     int: the longest document
    doc_ids        LongTensor (1, L): document index of each position (for per-document CP sharding)
    doc_supervised_tokens  LongTensor (docs,): n_i, the GLOBAL supervised count of each document; under
                   context parallelism recompute weights of a shard with
                   token_loss_weights(shard_shift_labels, shard_doc_ids, doc_supervised_tokens), or shard
                   loss_weights directly -- the same numbers.
    pixel_values   FloatTensor (tiles, 3, s, s): every tile / frame of the pack in token order (may be 0 tiles)
    num_tiles      LongTensor (blocks,): tiles per <img> block in token order (1 per video frame);
                   sum == tiles, and (input_ids == image token).sum() == tiles * tokens_per_tile
    tile_doc_ids   LongTensor (tiles,): document index of each tile (for splitting tiles across CP ranks)
    image_flags    LongTensor (tiles,): 1 for every real tile (InternVL convention)
    stats          dict: docs, tokens, padding_tokens, supervised_tokens, images, frames, tiles, degraded
                   (documents that degrade sampling reduced), bad_samples (BadSampleEvent of each document
                   skipped in this pack: dataset, id, reason, detail, file, position), worker_seconds
                   (read + decode time), doc_keys
Padding: with pad_to_multiple_of=m the pack is padded to a multiple of m with pad_token_id; the padding is
its own trailing document (in cu_seqlens, doc_ids and doc_supervised_tokens with n = 0, no tiles). A pack
whose documents all failed becomes a single padding document with zero weights (stats: docs 0,
supervised_tokens 0; `is_empty_pack`): every rank still gets a batch, and no rank may apply an update for it.
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
