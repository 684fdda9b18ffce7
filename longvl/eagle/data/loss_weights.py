"""Square-root averaged loss weights for packed sequences (Eagle 2.5 recipe).

A plain token mean lets long answers dominate a pack; a per-document mean lets one-word answers dominate.
Square-root averaging sits between: each supervised token of document i weighs
1 / (sqrt(n_i) * sum_j sqrt(n_j)), so the weights of a pack add up to 1 and document i's share is
proportional to sqrt(n_i). Under context parallelism a rank holds only part of each document, so the
counts n_i must be the global ones: pass them in instead of counting the local shard.
"""
import torch

IGNORE_INDEX = -100


def supervised_counts(labels, doc_ids, num_docs, ignore_index=IGNORE_INDEX):
    """Supervised tokens per document: `labels` and `doc_ids` have the same shape (doc index per token)."""
    if labels.shape != doc_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and doc_ids {tuple(doc_ids.shape)} differ in shape")
    mask = labels.reshape(-1) != ignore_index
    return torch.bincount(doc_ids.reshape(-1)[mask].long(), minlength=num_docs)


def sqrt_document_weights(counts):
    """Per-token weight of each document: 1 / (sqrt(n_i) * sum_j sqrt(n_j)); 0 where n_i = 0."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D (one per document), got shape {tuple(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("supervised token counts must be >= 0")
    roots = counts.sqrt()
    total = roots.sum()
    if total == 0:
        return torch.zeros_like(counts, dtype=torch.float32)
    weights = torch.where(counts > 0, 1.0 / (roots.clamp_min(1e-30) * total), torch.zeros_like(roots))
    return weights.float()


def token_loss_weights(labels, doc_ids, counts=None, ignore_index=IGNORE_INDEX):
    """Weight of every label position (0 where ignored), same shape as `labels`.

    `doc_ids[t]` is the document of position t; `counts` (global, per document) defaults to the counts
    found in `labels` itself, which is right only when `labels` covers whole documents.
    """
    if counts is None:
        num_docs = int(doc_ids.max()) + 1 if doc_ids.numel() else 0
        counts = supervised_counts(labels, doc_ids, num_docs, ignore_index)
    per_doc = sqrt_document_weights(counts).to(labels.device)
    weights = per_doc[doc_ids.long()]
    return torch.where(labels != ignore_index, weights, torch.zeros_like(weights))
