"""The trainer's view of longvl/eagle/data: prepare the dataset once, then a resumable loader per stage.

`prepare` (every rank; rank 0 does the work) generates the synthetic demo dataset when asked and reads the
tokenizer, which fixes the vocabulary and the `<IMG_CONTEXT>` id the model needs. `StageLoader` builds the
stage's offline index (rank 0, once per max length and processor setting), then iterates packed batches of
this data-parallel rank forever, epoch after epoch; `state_dict()` is the position after the last batch
handed out, so a checkpoint resumes on the next unseen pack even though workers prefetch.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from longvl.eagle.data.backend import BackendSpec
from longvl.eagle.data.index import build_indexes, index_is_current
from longvl.eagle.data.loader import build_loader


@dataclasses.dataclass
class DataInfo:
    mixture: str
    tokenizer: str | None          # a tokenizer folder, or None for the built-in tiny tokenizer
    vocab_size: int
    image_token_index: int
    pad_token_id: int


def load_tokenizer(folder: str | None):
    from longvl.eagle.processing.tokenizer import load_tokenizer, tiny_tokenizer

    return tiny_tokenizer() if folder is None else load_tokenizer(folder)


def prepare(config, rank: int) -> DataInfo:
    """Make sure the data exists (rank 0 generates the synthetic set), then describe it on every rank."""
    from longvl.eagle.processing.tokenizer import IMG_CONTEXT

    data_dir = Path(config.data.dir)
    mixture = data_dir / "mixture.yaml"
    if config.data.source == "synthetic":
        if rank == 0 and not mixture.exists():
            from longvl.eagle.data.synthetic import generate

            generate(str(data_dir), num=config.data.num_samples, seed=config.data.seed)
    elif config.data.source != "mixture":
        raise ValueError(f"data.source must be synthetic or mixture, got {config.data.source!r}")
    dist.barrier()
    if not mixture.exists():
        raise FileNotFoundError(f"no mixture file at {mixture}: point data.dir at a folder with mixture.yaml "
                                "(see longvl/eagle/data/mixture.py) or use data.source=synthetic")
    tokenizer = load_tokenizer(config.data.tokenizer)
    return DataInfo(mixture=str(mixture), tokenizer=config.data.tokenizer, vocab_size=len(tokenizer),
                    image_token_index=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
                    pad_token_id=tokenizer.pad_token_id or 0)


def backend_spec(info: DataInfo, model_config, stage) -> BackendSpec:
    """The processor settings of a stage: the model's tile geometry and the stage's frame and tile caps."""
    return BackendSpec(kwargs={"tokenizer": info.tokenizer, "tile_size": model_config.force_image_size,
                               "tokens_per_tile": model_config.tokens_per_tile,
                               "max_frames": stage.max_frames, "min_frames": min(8, stage.max_frames),
                               "max_tiles": stage.max_tiles})


class StageLoader:
    """Endless packed batches of one stage for data-parallel rank `dp_rank` of `dp`."""

    def __init__(self, config, info: DataInfo, model_config, stage, dp_rank: int, dp: int,
                 state: dict | None = None):
        spec = backend_spec(info, model_config, stage)
        if dist.get_rank() == 0 and not index_is_current(info.mixture, stage.max_length, spec):
            build_indexes(info.mixture, stage.max_length, spec, workers=config.data.index_workers)
        dist.barrier()
        self.loader = build_loader(info.mixture, stage.max_length, spec, rank=dp_rank, world_size=dp,
                                   seed=config.data.seed, num_workers=config.data.num_workers,
                                   pad_token_id=info.pad_token_id, image_size=model_config.force_image_size,
                                   image_token_id=info.image_token_index, tokens_per_tile=model_config.tokens_per_tile)
        if state is not None:
            self.loader.load_state_dict(state)

    def __iter__(self):
        while True:
            yield from self.loader

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def bad_sample_counts(self) -> Counter:
        """Samples the index excluded and loading skipped so far, by reason."""
        return self.loader.index_excluded.by_reason + self.loader.bad_samples.by_reason

    def bad_sample_summary(self) -> str:
        return self.loader.summary()

    def write_bad_samples(self, path) -> None:
        self.loader.write_bad_samples(path)
