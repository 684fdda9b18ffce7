"""A stateful sampler of packs: deterministic epochs, cost-balanced steps, O(1) exact resume.

An epoch's packs are a pure function of (seed, epoch, index): mixture draws, balanced packing, then a
seeded shuffle into a canonical pack order. Steps are cut from that order window by window: a window of
`world_size * balance_steps` packs is sorted by attention cost and cut into steps of `world_size` packs,
so the ranks of one step get packs of similar cost. Packs that do not fill a step move on to the next
window, so only the last < world_size packs of an epoch are dropped.

The resume state is the position of the current window plus the steps done in it: no data is replayed.
When the world size changes between stages, the old window is rebuilt, its consumed packs are removed,
and the rest is handed to the new world size -- no pack is repeated or lost.
"""
from dataclasses import dataclass

import numpy as np

from .packing import attention_cost, group_into_steps, pack_documents


@dataclass(frozen=True)
class DocRef:
    """Where one document of a pack lives, and what the index planned for it."""

    dataset: int
    record: int
    offset: int  # byte offset of the JSONL line, -1 for JSON-list files
    length: int
    video_meta: list


@dataclass(frozen=True)
class PackRequest:
    """What a rank asks the dataset for in one step, with the sampler state after consuming it."""

    docs: tuple
    state: dict


@dataclass
class _EpochPlan:
    draws: np.ndarray  # (n, 2): dataset, position in that dataset's index
    lengths: np.ndarray  # planned length per draw
    packs: list  # canonical order; each pack an array of draw numbers
    costs: np.ndarray  # attention cost per pack


class PackSampler:
    """Yields this rank's `PackRequest`s; state_dict() / load_state_dict() resume exactly."""

    def __init__(self, indexes, mixture, max_length, rank=0, world_size=1, seed=0, max_images=None,
                 max_frames=None, balance_steps=8):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if len(indexes) != len(mixture.datasets):
            raise ValueError(f"{len(indexes)} indexes for {len(mixture.datasets)} mixture datasets")
        if balance_steps < 1:
            raise ValueError(f"balance_steps must be >= 1, got {balance_steps}")
        self.indexes = indexes
        self.mixture = mixture
        self.max_length = max_length
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.max_images = max_images
        self.max_frames = max_frames
        self.balance_steps = balance_steps
        self._plans = {}
        # Identifies the data a state belongs to: resuming on another stage's index would silently
        # yield different packs.
        self._data_key = (f"L{max_length}:{sum(len(ix.records) for ix in indexes)}:"
                          f"{sum(int(ix.lengths.sum()) for ix in indexes)}")
        self._state = self._epoch_start(0)

    # ------------------------------------------------------------ planning
    def _epoch_start(self, epoch):
        return {"epoch": epoch, "cursor": 0, "carry": [], "steps_done": 0, "world_size": self.world_size,
                "window": self.world_size * self.balance_steps, "seed": self.seed, "data": self._data_key}

    def _plan(self, epoch):
        if epoch not in self._plans:
            self._plans = {epoch: self._build_plan(epoch)}  # keep one epoch: plans can be large
        return self._plans[epoch]

    def _build_plan(self, epoch):
        draws = self.mixture.epoch_draws([np.arange(len(ix.records)) for ix in self.indexes], self.seed, epoch)

        starts = np.cumsum([0] + [len(ix.records) for ix in self.indexes])[:-1]
        flat = starts[draws[:, 0]] + draws[:, 1]

        def column(name):
            return np.concatenate([getattr(ix, name) for ix in self.indexes]).astype(np.int64)[flat]

        lengths = column("lengths")
        packs = pack_documents(lengths, self.max_length, column("images"), column("frames"),
                               self.max_images, self.max_frames)
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(packs))
        packs = [np.asarray(packs[p], dtype=np.int64) for p in order.tolist()]
        costs = np.asarray([attention_cost(lengths[pack]) for pack in packs])
        return _EpochPlan(draws, lengths, packs, costs)

    def _request(self, plan, pack, state):
        docs = []
        for draw in plan.packs[pack].tolist():
            dataset, position = (int(v) for v in plan.draws[draw])
            index = self.indexes[dataset]
            record = int(index.records[position])
            docs.append(DocRef(dataset, record, int(index.offsets[position]), int(plan.lengths[draw]),
                               index.video_meta.get(record, [])))
        return PackRequest(tuple(docs), state)

    @staticmethod
    def _window(plan, state):
        """Canonical pack ids of the window a state points into, its steps, and where the next one starts."""
        fresh = max(0, state["window"] - len(state["carry"]))
        end = min(len(plan.packs), state["cursor"] + fresh)
        window = list(state["carry"]) + list(range(state["cursor"], end))
        steps, leftover = group_into_steps(plan.costs[window], state["world_size"])
        steps = [[window[i] for i in step] for step in steps]
        return steps, [window[i] for i in leftover], end

    # ------------------------------------------------------------ iteration
    def __iter__(self):
        """One epoch of this rank's packs; a state saved at an epoch's end starts the next epoch."""
        state, yielded, skipped_epoch = dict(self._state), False, False
        while True:
            plan = self._plan(state["epoch"])
            steps, leftover, end = self._window(plan, state)
            if not steps and end == len(plan.packs):  # epoch exhausted: the leftover (< world size) is dropped
                self._state = self._epoch_start(state["epoch"] + 1)
                if yielded:
                    return
                if skipped_epoch:
                    raise ValueError(f"epoch {state['epoch']} has {len(plan.packs)} packs, fewer than one "
                                     f"step of {self.world_size} ranks")
                state, skipped_epoch = dict(self._state), True
                continue
            for done in range(state["steps_done"], len(steps)):
                yielded = True
                yield self._request(plan, steps[done][self.rank], dict(state, steps_done=done + 1))
            state = dict(state, cursor=end, carry=leftover, steps_done=0)

    def __len__(self):
        """Steps the next iteration yields: the rest of this epoch, or all of the next one at an epoch's end."""
        plan = self._plan(self._state["epoch"])
        remaining = (len(plan.packs) - self._state["cursor"] + len(self._state["carry"])
                     - self._state["steps_done"] * self._state["world_size"]) // self.world_size
        return remaining or len(self._plan(self._state["epoch"] + 1).packs) // self.world_size

    def set_epoch(self, epoch):
        self._state = self._epoch_start(epoch)

    # ------------------------------------------------------------ resume
    def state_dict(self):
        return dict(self._state)

    def load_state_dict(self, state):
        """Resume from a state saved by any world size (and window size) with the same seed and data."""
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this sampler uses {self.seed}")
        if state["data"] != self._data_key:
            raise ValueError(f"state was saved for other data ({state['data']}, this sampler has {self._data_key}): "
                             "a loader state resumes the same mixture, index and max length only")
        if state["world_size"] == self.world_size and state["window"] == self.world_size * self.balance_steps:
            self._state = dict(state)
            return
        plan = self._plan(state["epoch"])
        steps, leftover, end = self._window(plan, state)
        pending = [pack for step in steps[state["steps_done"]:] for pack in step] + leftover
        self._state = dict(self._epoch_start(state["epoch"]), cursor=end, carry=sorted(pending))
