"""Zigzag sharding: round trips, padding, balance, and the per-rank structure attention relies on."""
import pytest
import torch

from longvl.parallel import LocalDocs, plan_sequence, shard, unshard


@pytest.mark.parametrize("lengths,world,ulysses", [(64, 4, 1), ([37], 2, 1), ([5, 1, 19, 3], 4, 2),
                                                    ([1, 2, 3], 4, 4), ([100, 7], 8, 2)])
def test_shard_unshard_round_trip(lengths, world, ulysses):
    plan = plan_sequence(lengths, world, ulysses)
    total = sum(plan.doc_lens)
    x = torch.randn(2, total, 3)
    parts = [shard(x, plan, r) for r in range(world)]
    assert len({p.shape[1] for p in parts}) == 1, "every rank holds the same number of tokens"
    assert all(n % (2 * world) == 0 for n in plan.padded_lens)
    torch.testing.assert_close(unshard(parts, plan), x)


def test_padding_values_and_positions():
    plan = plan_sequence([3, 6], 2)  # padded to [4, 8]
    labels = torch.arange(9).unsqueeze(0)
    parts = [shard(labels, plan, r, pad_value=-100) for r in range(2)]
    flat = torch.cat(parts, 1)
    assert (flat == -100).sum() == 3 and sorted(flat[flat >= 0].tolist()) == list(range(9))
    # rank 0 holds chunks 0 and 3 of every document: document 1 ([0,1,2,pad]) chunk 0 = [0], chunk 3 = [pad]
    assert parts[0][0, :2].tolist() == [0, -100]


def test_zigzag_chunks_and_local_docs():
    plan = plan_sequence([16, 8], 2)
    assert plan.local_index(0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 22, 23]
    docs = LocalDocs.build(12, 2, plan.cu_seqlens(), torch.device("cpu"))
    assert docs.chunk_lens == [4, 2]
    assert docs.rows(2).tolist() == [4, 5, 6, 7, 10, 11]
    assert docs.varlen(1, 2)["cu_seqlens_k"].tolist() == [0, 8, 12]


def test_bad_plans_raise():
    with pytest.raises(ValueError, match="positive"):
        plan_sequence([3, 0], 2)
    with pytest.raises(ValueError, match="ulysses_size"):
        plan_sequence(16, 4, 3)
    with pytest.raises(ValueError, match="multiples of 2 x ring size"):
        LocalDocs.build(8, 2, torch.tensor([0, 6, 10]), torch.device("cpu"))
    with pytest.raises(ValueError, match="full \(non-causal\).*not exact"):
        plan_sequence([5, 8], 2).check_full_attention()
    with pytest.raises(ValueError, match="tokens along dim"):
        shard(torch.zeros(1, 5), plan_sequence(6, 2), 0)

