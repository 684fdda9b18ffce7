"""Collate one processed pack into the batch dict the model, the loss and the context-parallel shard use.

Labels are emitted twice: `labels` aligned with input_ids (Hugging Face convention) and `shift_labels`,
already shifted inside each document, so that position t holds the token position t must predict. The
shift has to happen before context-parallel sharding (a shard does not hold its right neighbour) and per
document (the last token of a document must not predict the next document's first token). `loss_weights`
is aligned with `shift_labels`.
"""
import torch

from .loss_weights import IGNORE_INDEX, supervised_counts, token_loss_weights


def _shift_within_documents(labels, cu_seqlens):
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:-1] = labels[1:]
    shifted[cu_seqlens[1:] - 1] = IGNORE_INDEX  # each document's last position predicts nothing
    return shifted


def collate_pack(pack, pad_token_id=0, pad_to_multiple_of=1, image_size=448):
    """Build the batch dict (see longvl.eagle.data's docstring) from a `ProcessedPack`.

    Padding up to a multiple of `pad_to_multiple_of` (context-parallel sharding needs one) forms its own
    trailing document with no supervision, so attention and positions stay per document. A pack whose
    documents all failed becomes one padding document: every rank still gets a batch, with zero loss.
    """
    lengths = [len(doc["input_ids"]) for doc in pack.docs]
    total = sum(lengths)
    padding = (-total) % pad_to_multiple_of if total else pad_to_multiple_of
    if padding:
        lengths.append(padding)
    input_ids = torch.cat([torch.as_tensor(doc["input_ids"], dtype=torch.long) for doc in pack.docs]
                          + [torch.full((padding,), pad_token_id, dtype=torch.long)])
    labels = torch.cat([torch.as_tensor(doc["labels"], dtype=torch.long) for doc in pack.docs]
                       + [torch.full((padding,), IGNORE_INDEX, dtype=torch.long)])
    doc_lengths = torch.tensor(lengths, dtype=torch.long)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(doc_lengths, 0)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), doc_lengths)
    position_ids = torch.arange(len(input_ids)) - cu_seqlens[:-1].long()[doc_ids]
    shift_labels = _shift_within_documents(labels, cu_seqlens.long())
    counts = supervised_counts(shift_labels, doc_ids, len(lengths))
    loss_weights = token_loss_weights(shift_labels, doc_ids, counts)

    tiles = [torch.as_tensor(doc["pixel_values"]) for doc in pack.docs]
    tiles_per_doc = torch.tensor([t.shape[0] for t in tiles] + [0] * bool(padding), dtype=torch.long)
    pixel_values = torch.cat(tiles) if tiles else torch.zeros(0, 3, image_size, image_size)
    num_tiles = torch.tensor([n for doc in pack.docs for n in doc["num_tiles"]], dtype=torch.long)
    if int(num_tiles.sum()) != pixel_values.shape[0]:
        raise ValueError(f"num_tiles add up to {int(num_tiles.sum())} but pixel_values has "
                         f"{pixel_values.shape[0]} tiles")
    frames = sum(int(doc.get("frames", 0)) for doc in pack.docs)
    return {
        "input_ids": input_ids[None],
        "labels": labels[None],
        "shift_labels": shift_labels[None],
        "loss_weights": loss_weights[None],
        "position_ids": position_ids[None],
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(doc_lengths.max()),
        "doc_ids": doc_ids[None],
        "doc_supervised_tokens": counts,
        "pixel_values": pixel_values,
        "num_tiles": num_tiles,
        "tile_doc_ids": torch.repeat_interleave(torch.arange(len(lengths)), tiles_per_doc),
        "image_flags": torch.ones(pixel_values.shape[0], dtype=torch.long),
        "stats": {
            "docs": len(pack.docs),
            "tokens": total,
            "padding_tokens": padding,
            "supervised_tokens": int(counts.sum()),
            "images": len(num_tiles) - frames,
            "frames": frames,
            "tiles": int(pixel_values.shape[0]),
            "degraded": sum(bool(doc.get("degraded")) for doc in pack.docs),
            "bad_samples": pack.bad_samples,
            "worker_seconds": pack.seconds,
            "doc_keys": [(doc["dataset"], doc["id"]) for doc in pack.docs],
        },
        "resume_state": pack.state,
    }
