"""The stateful pack sampler: determinism, rank balance, exact resume, world-size changes (longvl.eagle.data.sampler)."""
import itertools
from collections import Counter

import numpy as np
import pytest

from longvl.eagle.data.index import DatasetIndex
from longvl.eagle.data.mixture import DatasetSpec, Mixture
from longvl.eagle.data.sampler import PackSampler

MAX_LENGTH = 4096


def _index(name, n, rng, video=False):
    lengths = rng.integers(2000, MAX_LENGTH, n) if video else rng.integers(50, 1500, n)
    return DatasetIndex(name=name, annotation=f"/x/{name}.jsonl", root="/x", records=np.arange(n) * 2,
                        offsets=np.arange(n) * 100, lengths=lengths, images=rng.integers(0, 3, n),
                        frames=rng.integers(8, 32, n) if video else np.zeros(n, dtype=np.int64),
                        video_meta={2 * i: [{"frames": 10}] for i in range(n)} if video else {})


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    indexes = [_index("text", 300, rng), _index("video", 60, rng, video=True)]
    mixture = Mixture([DatasetSpec("text", "/x/text.jsonl", "/x", repeat=1.0),
                       DatasetSpec("video", "/x/video.jsonl", "/x", repeat=1.5)])
    return indexes, mixture


def _samplers(data, world_size, seed=0, **kwargs):
    indexes, mixture = data
    return [PackSampler(indexes, mixture, MAX_LENGTH, rank, world_size, seed, balance_steps=3, **kwargs)
            for rank in range(world_size)]


def _key(request):
    return tuple((doc.dataset, doc.record) for doc in request.docs)


def _plan_keys(sampler, epoch=0):
    plan = sampler._plan(epoch)
    return [_key(sampler._request(plan, pack, {})) for pack in range(len(plan.packs))]


def test_one_epoch_covers_every_draw_once_per_rank_in_lockstep(data):
    samplers = _samplers(data, 4, max_frames=64)
    per_rank = [list(s) for s in samplers]
    steps = len(samplers[0])
    assert all(len(requests) == steps for requests in per_rank)  # no rank waits for another
    planned = _plan_keys(samplers[0])
    yielded = [_key(r) for requests in per_rank for r in requests]
    assert len(yielded) == len(planned) - len(planned) % 4  # only the final partial step is dropped
    assert not Counter(yielded) - Counter(planned)
    assert sum(len(k) for k in planned) == 300 + 90  # repeat 1 and 1.5
    for requests in per_rank:
        for request in requests:
            assert sum(doc.length for doc in request.docs) <= MAX_LENGTH
            assert all(doc.video_meta == [{"frames": 10}] for doc in request.docs if doc.dataset == 1)
            assert all(doc.offset == doc.record * 50 for doc in request.docs)
    # A step lasts as long as its costliest pack: balancing brings that close to the mean, unlike
    # cutting steps straight from the shuffled pack order.
    costs = np.array([[sum(d.length ** 2 for d in r.docs) for r in step] for step in zip(*per_rank)])
    canonical = samplers[0]._plan(0).costs[:costs.size].reshape(-1, 4)
    imbalance = costs.max(1).sum() / costs.mean(1).sum()
    assert imbalance < 1.25 and imbalance < canonical.max(1).sum() / canonical.mean(1).sum() - 0.2
    fill = np.mean([sum(d.length for d in r.docs) for requests in per_rank for r in requests]) / MAX_LENGTH
    assert fill > 0.95
    assert [_key(r) for r in _samplers(data, 4, max_frames=64)[2]] == [_key(r) for r in per_rank[2]]


def test_resume_mid_epoch_gives_the_same_next_batches(data):
    reference = [list(itertools.islice(iter(s), 12)) for s in _samplers(data, 2, seed=5)]
    for stop in (0, 1, 4, 7):
        fresh = _samplers(data, 2, seed=5)
        for rank, sampler in enumerate(fresh):
            sampler.load_state_dict(reference[rank][stop].state if stop else sampler.state_dict())
            resumed = list(itertools.islice(iter(sampler), 12 - stop - 1 if stop else 12))
            expected = reference[rank][stop + 1:] if stop else reference[rank]
            assert [_key(r) for r in resumed] == [_key(r) for r in expected]


def test_epochs_differ_and_an_epoch_end_state_starts_the_next_epoch(data):
    sampler = _samplers(data, 2)[0]
    first = list(sampler)
    assert sampler.state_dict()["epoch"] == 1
    second = list(sampler)
    assert [_key(r) for r in first] != [_key(r) for r in second]
    resumed = _samplers(data, 2)[0]
    resumed.load_state_dict(first[-1].state)  # saved after the last batch of epoch 0
    assert len(resumed) == len(second)
    assert [_key(r) for r in resumed] == [_key(r) for r in second]


@pytest.mark.parametrize("old, new, stop", [(4, 2, 5), (2, 3, 3), (3, 1, 0), (1, 4, 9)])
def test_world_size_change_loses_and_repeats_nothing(data, old, new, stop):
    before = [list(itertools.islice(iter(s), stop)) for s in _samplers(data, old, seed=1)]
    state = before[0][-1].state if stop else _samplers(data, old, seed=1)[0].state_dict()
    after = []
    for sampler in _samplers(data, new, seed=1):
        sampler.load_state_dict(state)
        assert sampler.state_dict()["world_size"] == new
        after.append(list(sampler))
        assert len(after[-1]) == len(after[0])
    seen = [_key(r) for requests in before + after for r in requests]
    planned = _plan_keys(_samplers(data, 1, seed=1)[0])
    assert not Counter(seen) - Counter(planned)  # no pack is yielded more often than planned
    assert len(planned) - new < len(seen) <= len(planned)  # only the final partial step is dropped


def test_state_dict_checks_seed_and_data(data):
    sampler = _samplers(data, 1, seed=1)[0]
    with pytest.raises(ValueError, match="seed"):
        sampler.load_state_dict(_samplers(data, 1, seed=2)[0].state_dict())
    indexes, mixture = data
    other = PackSampler(indexes, mixture, MAX_LENGTH * 2, seed=1)
    with pytest.raises(ValueError, match="saved for other data"):
        other.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="rank 2 outside"):
        PackSampler(*data, MAX_LENGTH, rank=2, world_size=2)


def test_too_few_packs_for_a_step_raises(data):
    rng = np.random.default_rng(0)
    tiny = [_index("a", 1, rng)]
    sampler = PackSampler(tiny, Mixture([DatasetSpec("a", "/x/a.jsonl", "/x", repeat=1.0)]), MAX_LENGTH,
                          rank=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than one step of 2 ranks"):
        list(sampler)
