"""Which tokens each context-parallel rank holds, and the per-rank sequence structure attention needs.

Layout ("zigzag per document, then contiguous per Ulysses rank"): with W = ring x ulysses ranks, every
document is padded at its end to a multiple of 2W tokens and cut into 2 x ring chunks; ring rank r keeps
chunks r and 2*ring-1-r of every document (so causal work is balanced), concatenated document by document;
that ring-local sequence is cut into `ulysses` equal contiguous parts, one per Ulysses rank (CP rank =
ring_rank * ulysses + ulysses_rank: Ulysses ranks are neighbours). A dense sequence is one document.

Padding: pad tokens sit at the end of their document, so under causal attention no real token attends to
them (they come later) and their outputs are dropped by `unshard`; shard labels with -100 and loss weights
with 0 there so they add nothing to the loss. Full (non-causal) attention would let real tokens see pads:
context-parallel attention takes the plan and refuses it (`ShardPlan.check_full_attention`) unless every
document length is a multiple of 2W.

Inputs, position ids, already-shifted labels and loss weights are all split with `shard` on the same plan.
"""
import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass
class ShardPlan:
    """How a (packed) sequence is split over `ring_size * ulysses_size` ranks."""
    doc_lens: list            # real document lengths
    padded_lens: list         # each rounded up to a multiple of 2 * world_size
    ring_size: int
    ulysses_size: int

    @property
    def world_size(self):
        return self.ring_size * self.ulysses_size

    @property
    def padded(self):
        return self.doc_lens != self.padded_lens

    @property
    def packed(self):
        return len(self.doc_lens) > 1

    def cu_seqlens(self, device=None):
        """Cumulative padded document lengths (int32) on `device`, None for one document; cached per device."""
        if not self.packed:
            return None
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        cache = self.__dict__.setdefault("_cu_seqlens", {})
        if key not in cache:
            cache[key] = _cumulative(self.padded_lens, device)
        return cache[key]

    @property
    def local_len(self):
        """Tokens each rank holds."""
        return sum(self.padded_lens) // self.world_size

    def check_full_attention(self):
        """Full (non-causal) attention over padded documents would let real tokens attend to the padding."""
        if self.padded:
            raise ValueError(f"full (non-causal) context-parallel attention over padded documents is not exact: "
                             f"real tokens would attend to the padding. Document lengths {self.doc_lens} must be "
                             f"multiples of 2 x {self.world_size} = {2 * self.world_size} (pad them yourself, as "
                             f"separate documents), or use causal attention")

    def local_index(self, rank):
        """Positions (in the padded global sequence) of the tokens rank `rank` holds, in local order."""
        ring_rank, ulysses_rank = divmod(rank, self.ulysses_size)
        pieces, start = [], 0
        for length in self.padded_lens:
            chunk = length // (2 * self.ring_size)
            for c in (ring_rank, 2 * self.ring_size - 1 - ring_rank):
                pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
            start += length
        ring_local = torch.cat(pieces)
        part = ring_local.numel() // self.ulysses_size
        return ring_local[ulysses_rank * part:(ulysses_rank + 1) * part]

    def source_index(self):
        """For every padded token, its index in the unpadded sequence, or -1 for padding."""
        parts, start = [], 0
        for real, padded in zip(self.doc_lens, self.padded_lens):
            parts += [torch.arange(start, start + real), torch.full((padded - real,), -1)]
            start += real
        return torch.cat(parts)


def _cumulative(lengths, device):
    return torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)


def plan_sequence(lengths, world_size, ulysses_size=1):
    """Plan for one sequence (an int length) or packed documents (a list of lengths, or cu_seqlens)."""
    if world_size % ulysses_size:
        raise ValueError(f"ulysses_size {ulysses_size} must divide the context-parallel size {world_size}")
    if isinstance(lengths, int):
        lengths = [lengths]
    elif isinstance(lengths, torch.Tensor):
        lengths = torch.diff(lengths.cpu().long()).tolist()
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) <= 0:
        raise ValueError(f"document lengths must be positive, got {lengths}")
    multiple = 2 * world_size
    padded = [-(-n // multiple) * multiple for n in lengths]
    return ShardPlan(lengths, padded, world_size // ulysses_size, ulysses_size)


def shard(x, plan, rank, dim=1, pad_value=0):
    """This rank's part of `x` (sequence along `dim`), padding documents with `pad_value` first."""
    if x.shape[dim] != sum(plan.doc_lens):
        raise ValueError(f"tensor has {x.shape[dim]} tokens along dim {dim}, the plan {sum(plan.doc_lens)}")
    source = plan.source_index()[plan.local_index(rank)].to(x.device)
    local = x.index_select(dim, source.clamp(min=0))
    is_pad = (source < 0).view([-1 if d == dim % x.dim() else 1 for d in range(x.dim())])
    return local.masked_fill(is_pad, pad_value) if plan.padded else local


def unshard(parts, plan, dim=1):
    """Inverse of `shard`: the full unpadded sequence from every rank's part (list in rank order)."""
    order = torch.cat([plan.local_index(r) for r in range(plan.world_size)]).to(parts[0].device)
    padded = torch.cat(parts, dim)
    full = torch.empty_like(padded).index_copy_(dim, order, padded)
    keep = (plan.source_index() >= 0).nonzero().squeeze(1).to(full.device)
    return full.index_select(dim, keep)


def gather(local, plan, group=None, dim=1):
    """All-gather every rank's part of a sequence and `unshard` it (for checks and evaluation)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return unshard(parts, plan, dim)


@dataclasses.dataclass
class LocalDocs:
    """The structure of a ring-local sequence: per document, piece 1 (chunk r) then piece 2 (chunk 2R-1-r).

    Every ring rank has the same structure (pieces of `chunk_lens[d]` tokens), so one object describes the
    KV blocks arriving from any rank. Dense sequences have one document and use slices, not indices.
    """
    chunk_lens: list            # c_d per document
    ring_size: int
    dense: bool
    device: torch.device

    @classmethod
    def build(cls, local_len, ring_size, cu_seqlens, device):
        if cu_seqlens is None:
            if local_len % 2:
                raise ValueError(f"local sequence length {local_len} must be even (two zigzag chunks)")
            return cls([local_len // 2], ring_size, True, device)
        lengths = torch.diff(cu_seqlens.cpu().long()).tolist()
        if any(n % (2 * ring_size) for n in lengths):
            raise ValueError(f"padded document lengths {lengths} must be multiples of 2 x ring size "
                             f"({2 * ring_size}); build cu_seqlens with plan_sequence(...).cu_seqlens()")
        chunks = [n // (2 * ring_size) for n in lengths]
        if 2 * sum(chunks) != local_len:
            raise ValueError(f"cu_seqlens describe {sum(lengths)} tokens, i.e. {2 * sum(chunks)} per ring rank, "
                             f"but the local sequence has {local_len}")
        return cls(chunks, ring_size, False, device)

    @property
    def local_len(self):
        return 2 * sum(self.chunk_lens)

    def varlen(self, q_multiple, k_multiple):
        """Attention kwargs for q = `q_multiple` chunks per document against k = `k_multiple` chunks per doc."""
        if self.dense:
            return {}
        lens_q, lens_k = [q_multiple * c for c in self.chunk_lens], [k_multiple * c for c in self.chunk_lens]
        return {"cu_seqlens_q": _cumulative(lens_q, self.device), "cu_seqlens_k": _cumulative(lens_k, self.device),
                "max_seqlen_q": max(lens_q), "max_seqlen_k": max(lens_k), "seqlens_q": lens_q, "seqlens_k": lens_k}

    def rows(self, piece):
        """Local rows of piece 1 or 2 of every document: a slice (dense) or an index tensor."""
        if self.dense:
            c = self.chunk_lens[0]
            return slice(0, c) if piece == 1 else slice(c, 2 * c)
        return self._piece_index(piece).to(self.device)

    def _piece_index(self, piece):
        parts, start = [], 0
        for c in self.chunk_lens:
            parts.append(torch.arange(start + (piece - 1) * c, start + piece * c))
            start += 2 * c
        return torch.cat(parts)

    def gathered_index(self, ranks, pieces):
        """(rank, position) pairs selecting, document by document, the given pieces of the given ranks'
        tokens out of an all-gathered (ranks, local_len) buffer."""
        rank_ids, positions, start = [], [], 0
        for c in self.chunk_lens:
            for rank in ranks:
                for piece in pieces:
                    positions.append(torch.arange(start + (piece - 1) * c, start + piece * c))
                    rank_ids.append(torch.full((c,), rank))
            start += 2 * c
        return torch.cat(rank_ids).to(self.device), torch.cat(positions).to(self.device)
