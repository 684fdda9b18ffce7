"""Packing, square-root loss weights and the pack collator (longvl.eagle.data.packing / loss_weights / collate)."""
import math

import numpy as np
import pytest
import torch

from longvl.eagle.data.collate import collate_pack
from longvl.eagle.data.dataset import ProcessedPack
from longvl.eagle.data.loss_weights import sqrt_document_weights, supervised_counts, token_loss_weights
from longvl.eagle.data.packing import attention_cost, group_into_steps, pack_documents


def _check_packs(packs, lengths, max_length):
    flat = sorted(doc for pack in packs for doc in pack)
    assert flat == list(range(len(lengths)))  # every document exactly once, never split
    assert all(sum(lengths[d] for d in pack) <= max_length for pack in packs)


@pytest.mark.parametrize("seed", range(4))
def test_packing_fits_and_keeps_documents_whole(seed):
    rng = np.random.default_rng(seed)
    max_length = int(rng.integers(500, 5000))
    lengths = np.concatenate([rng.integers(1, max_length // 8, 300), rng.integers(max_length // 2, max_length + 1, 20)])
    packs = pack_documents(lengths, max_length)
    _check_packs(packs, lengths, max_length)
    # Worst-fit decreasing: no two packs could be merged, so the pack count is near the lower bound.
    fills = sorted(sum(lengths[d] for d in pack) for pack in packs)
    assert fills[0] + fills[1] > max_length
    assert len(packs) <= math.ceil(lengths.sum() / max_length) + 2
    assert packs == pack_documents(lengths, max_length)  # deterministic


def test_packing_places_into_least_full_pack():
    # Longest first: 6 -> P0; 5 -> P1 (6 + 5 > 10); 4 -> P1 (least full: 5); 3 -> P0 (6); 2 fits neither (9 + 2).
    packs = pack_documents([3, 6, 2, 5, 4], max_length=10)
    assert [sorted(p) for p in packs] == [[0, 1], [3, 4], [2]]


def test_packing_caps_on_images_and_frames():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 200, 200)
    images = rng.integers(0, 4, 200)
    frames = np.where(rng.random(200) < 0.3, rng.integers(8, 64, 200), 0)
    frames[0] = 500  # alone above the cap: gets a pack of its own
    packs = pack_documents(lengths, 2048, images, frames, max_images=6, max_frames=96)
    _check_packs(packs, lengths, 2048)
    for pack in packs:
        if len(pack) > 1:
            assert images[pack].sum() <= 6 and frames[pack].sum() <= 96
    assert [0] in packs


def test_packing_rejects_bad_lengths():
    with pytest.raises(ValueError, match="outside 1..max_length=8"):
        pack_documents([3, 9], 8)
    with pytest.raises(ValueError, match="outside"):
        pack_documents([0, 2], 8)
    assert pack_documents([], 8) == []


def test_group_into_steps_balances_cost():
    rng = np.random.default_rng(0)
    packs = [rng.integers(1, 4000, rng.integers(1, 12)) for _ in range(67)]
    costs = [attention_cost(p) for p in packs]
    assert costs[0] == float(np.sum(packs[0].astype(np.float64) ** 2))
    steps, leftover = group_into_steps(costs, 4)
    assert len(steps) == 16 and len(leftover) == 3
    assert sorted(i for s in steps for i in s) == sorted(set(range(67)) - set(leftover))
    # Within a step the spread is far below the spread of random grouping.
    spread = np.mean([max(costs[i] for i in s) - min(costs[i] for i in s) for s in steps])
    random_spread = np.mean([np.ptp(np.asarray(costs)[rng.permutation(67)[:4]]) for _ in range(200)])
    assert spread < random_spread / 3
    with pytest.raises(ValueError, match="world_size"):
        group_into_steps(costs, 0)


def test_sqrt_weights_match_formula_and_sum_to_one():
    counts = torch.tensor([1, 4, 0, 37, 1000])
    weights = sqrt_document_weights(counts).double()
    roots = counts.double().sqrt()
    expected = torch.where(counts > 0, 1 / (roots * roots.sum()), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)  # float32 result
    assert math.isclose(float((weights * counts).sum()), 1.0, rel_tol=1e-6)
    # Document i's total share is sqrt(n_i) / sum_j sqrt(n_j).
    torch.testing.assert_close((weights * counts), roots / roots.sum(), rtol=1e-6, atol=1e-12)
    assert sqrt_document_weights(torch.zeros(3)).sum() == 0
    with pytest.raises(ValueError, match="1-D"):
        sqrt_document_weights(torch.ones(2, 2))
    with pytest.raises(ValueError, match=">= 0"):
        sqrt_document_weights(torch.tensor([-1.0]))


def test_token_weights_with_global_counts_on_shards():
    """Under context parallelism each shard passes global counts and gets the full-pack weights."""
    torch.manual_seed(0)
    doc_ids = torch.repeat_interleave(torch.arange(4), torch.tensor([13, 7, 29, 15]))
    labels = torch.randint(0, 50, (64,))
    labels[torch.rand(64) < 0.4] = -100
    full = token_loss_weights(labels, doc_ids)
    assert math.isclose(float(full.sum()), 1.0, rel_tol=1e-6)
    assert (full[labels == -100] == 0).all()
    counts = supervised_counts(labels, doc_ids, 4)
    shards = torch.tensor_split(torch.randperm(64), 4)  # any layout, e.g. zigzag
    pieces = torch.zeros(64)
    for shard in shards:
        pieces[shard] = token_loss_weights(labels[shard], doc_ids[shard], counts)
    torch.testing.assert_close(pieces, full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="differ in shape"):
        supervised_counts(labels, doc_ids[:3], 4)


IMAGE_TOKEN, TOKENS_PER_TILE = 5, 2
COLLATE = dict(image_token_id=IMAGE_TOKEN, tokens_per_tile=TOKENS_PER_TILE)


def _doc(rng, length, tiles=(), frames=0, supervised=0.5):
    ids = torch.as_tensor(rng.integers(10, 1000, length))
    total = int(sum(tiles))
    ids[3:3 + total * TOKENS_PER_TILE] = IMAGE_TOKEN  # the tiles' features go here, in order
    labels = torch.where(torch.as_tensor(rng.random(length) < supervised), ids, torch.full_like(ids, -100))
    labels[ids == IMAGE_TOKEN] = -100
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(total, 3, 4, 4),
            "num_tiles": list(tiles), "frames": frames, "degraded": "frames" if frames else "",
            "dataset": "d", "id": f"r{length}"}


def test_collate_positions_cu_seqlens_labels_and_weights():
    rng = np.random.default_rng(0)
    docs = [_doc(rng, 37, tiles=(5, 1)), _doc(rng, 11), _doc(rng, 52, tiles=(1, 1, 1), frames=3)]
    batch = collate_pack(ProcessedPack(docs, [{"dataset": "d", "id": "x", "reason": "timeout", "detail": ""}],
                                       {"s": 1}, 0.1), pad_to_multiple_of=16, **COLLATE)
    total, padded = 100, 112
    assert batch.input_ids.shape == (1, padded) and batch.target_ids.shape == (1, padded)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 37, 48, 100, 112] and batch.stats.doc_lengths == [37, 11, 52]
    expected_positions = list(range(37)) + list(range(11)) + list(range(52)) + list(range(12))
    assert batch.position_ids[0].tolist() == expected_positions
    shifted = batch.target_ids[0]
    start = 0
    for doc, end in zip(docs, [37, 48, 100]):
        assert torch.equal(batch.input_ids[0, start:end], doc["input_ids"])
        assert torch.equal(shifted[start:end - 1], doc["labels"][1:])
        assert shifted[end - 1] == -100  # never predicts the next document
        start = end
    assert (shifted[total:] == -100).all() and (batch.input_ids[0, total:] == 0).all()
    counts = [int((d["labels"][1:] != -100).sum()) for d in docs] + [0]
    assert batch.stats.supervised_tokens == sum(counts)
    weights = batch.loss_weights[0]
    roots = sum(math.sqrt(n) for n in counts)
    for i, (lo, hi) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())):
        mask = shifted[lo:hi] != -100
        assert int(mask.sum()) == counts[i]
        if counts[i]:
            torch.testing.assert_close(weights[lo:hi][mask], torch.full((counts[i],), 1 / (math.sqrt(counts[i]) * roots)))
        assert (weights[lo:hi][~mask] == 0).all()
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-5)
    assert batch.pixel_values.shape == (9, 3, 4, 4)
    feature = batch.feature_index[0]   # every tile's rows, in token order, at the image tokens
    assert feature[batch.input_ids[0] == IMAGE_TOKEN].tolist() == list(range(9 * TOKENS_PER_TILE))
    assert (feature[batch.input_ids[0] != IMAGE_TOKEN] == -1).all()
    stats = batch.stats
    assert (stats.images, stats.frames, stats.tiles, stats.degraded) == (2, 3, 9, 1)
    assert stats.tokens == total and stats.padding_tokens == 12 and stats.docs == 3
    assert stats.bad_samples[0]["reason"] == "timeout" and batch.resume_state == {"s": 1}


def test_collate_empty_pack_gives_zero_loss_batch():
    batch = collate_pack(ProcessedPack([], [], {}, 0.0), pad_token_id=7, pad_to_multiple_of=8, image_size=14,
                         **COLLATE)
    assert batch.input_ids.tolist() == [[7] * 8] and batch.cu_seqlens.tolist() == [0, 8]
    assert batch.loss_weights.sum() == 0 and batch.pixel_values.shape == (0, 3, 14, 14) and batch.stats.docs == 0


def test_collate_rejects_tile_count_mismatch():
    rng = np.random.default_rng(0)
    doc = _doc(rng, 9, tiles=(2,))
    doc["num_tiles"] = [3]
    with pytest.raises(ValueError, match="num_tiles add up to 3 but pixel_values has 2"):
        collate_pack(ProcessedPack([doc], [], {}, 0.0), **COLLATE)


def test_collate_rejects_image_tokens_that_do_not_match_the_tiles():
    rng = np.random.default_rng(0)
    doc = _doc(rng, 20, tiles=(2,))
    doc["input_ids"][3] = 11   # one image token fewer than the two tiles need
    with pytest.raises(ValueError, match="d/r20 has 3 image tokens .* 2 tiles give 4 feature rows"):
        collate_pack(ProcessedPack([doc], [], {}, 0.0), **COLLATE)
