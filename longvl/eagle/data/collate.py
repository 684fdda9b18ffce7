"""Collate one processed pack into a `PackedBatch` (longvl/eagle/data/batch.py).

Targets are shifted here, inside each document, so that position t holds the token position t must predict:
the shift has to happen before context-parallel sharding (a shard does not hold its right neighbour) and per
document (the last token of a document must not predict the next document's first token).
"""
import torch

from .batch import IGNORE_INDEX, PackedBatch, PackStats
from .loss_weights import supervised_counts, token_loss_weights


def _shift_within_documents(labels, cu_seqlens):
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:-1] = labels[1:]
    shifted[cu_seqlens[1:] - 1] = IGNORE_INDEX  # each document's last position predicts nothing
    return shifted


def _feature_index(docs, image_token_id, tokens_per_tile):
    """Feature row of every image token, -1 elsewhere; each document's image tokens must match its tiles."""
    parts, row = [], 0
    for doc in docs:
        ids = torch.as_tensor(doc["input_ids"], dtype=torch.long)
        is_image = ids == image_token_id
        slots, rows = int(is_image.sum()), int(sum(doc["num_tiles"])) * tokens_per_tile
        if slots != rows:
            raise ValueError(f"document {doc['dataset']}/{doc['id']} has {slots} image tokens (id {image_token_id}) "
                             f"but its {sum(doc['num_tiles'])} tiles give {rows} feature rows: the processor and "
                             f"the model disagree on tokens per tile")
        parts.append(torch.where(is_image, row + is_image.long().cumsum(0) - 1, torch.full_like(ids, -1)))
        row += rows
    return parts


def collate_pack(pack, *, image_token_id, tokens_per_tile, pad_token_id=0, pad_to_multiple_of=1, image_size=448):
    """Build the `PackedBatch` of a `ProcessedPack`.

    Padding up to a multiple of `pad_to_multiple_of` forms its own trailing document with no supervision,
    so attention and positions stay per document. A pack whose documents all failed becomes one padding
    document with zero loss weights (`stats.docs == 0`): every rank still gets a batch.
    """
    tiles = [torch.as_tensor(doc["pixel_values"]) for doc in pack.docs]
    pixel_values = torch.cat(tiles) if tiles else torch.zeros(0, 3, image_size, image_size)
    num_tiles = [n for doc in pack.docs for n in doc["num_tiles"]]
    if sum(num_tiles) != pixel_values.shape[0]:
        raise ValueError(f"num_tiles add up to {sum(num_tiles)} but pixel_values has {pixel_values.shape[0]} tiles")
    lengths = [len(doc["input_ids"]) for doc in pack.docs]
    total = sum(lengths)
    padding = (-total) % pad_to_multiple_of if total else pad_to_multiple_of
    doc_lengths = list(lengths)
    if padding:
        lengths.append(padding)
    input_ids = torch.cat([torch.as_tensor(doc["input_ids"], dtype=torch.long) for doc in pack.docs]
                          + [torch.full((padding,), pad_token_id, dtype=torch.long)])
    labels = torch.cat([torch.as_tensor(doc["labels"], dtype=torch.long) for doc in pack.docs]
                       + [torch.full((padding,), IGNORE_INDEX, dtype=torch.long)])
    feature_index = torch.cat(_feature_index(pack.docs, image_token_id, tokens_per_tile)
                              + [torch.full((padding,), -1, dtype=torch.long)])
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position_ids = torch.arange(len(input_ids)) - cu_seqlens[:-1].long()[doc_ids]
    target_ids = _shift_within_documents(labels, cu_seqlens.long())
    counts = supervised_counts(target_ids, doc_ids, len(lengths))
    loss_weights = token_loss_weights(target_ids, doc_ids, counts)

    frames = sum(int(doc.get("frames", 0)) for doc in pack.docs)
    stats = PackStats(doc_lengths=doc_lengths, tokens=total, padding_tokens=padding,
                      supervised_tokens=int(counts.sum()), images=len(num_tiles) - frames, frames=frames,
                      tiles=int(pixel_values.shape[0]), degraded=sum(bool(doc.get("degraded")) for doc in pack.docs),
                      bad_samples=pack.bad_samples, worker_seconds=pack.seconds,
                      doc_keys=[(doc["dataset"], doc["id"]) for doc in pack.docs])
    return PackedBatch(input_ids=input_ids[None], position_ids=position_ids[None], target_ids=target_ids[None],
                       loss_weights=loss_weights[None], feature_index=feature_index[None], cu_seqlens=cu_seqlens,
                       pixel_values=pixel_values, stats=stats, resume_state=pack.state)
