"""Dataset mixtures: which annotation files a stage trains on and how often each sample is drawn.

A mixture file (YAML, or InternVL's meta JSON) lists datasets with either `repeat` (draws per sample per
epoch; fractions draw a seeded subset) or `ratio` (share of the epoch's draws). The draws of an epoch are
a pure function of (seed, epoch), which is what lets the sampler resume without replaying anything.

The mixture's folder is the data folder: every dataset's offline index is written inside it, in
`.longvl-index/`, or in a cache folder the user names -- never next to an annotation file, which may lie
anywhere the mixture points. Index file names come from a sanitised dataset name and a hash of the
annotation's path, so no name in a mixture file can steer a write out of that folder.
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import yaml


@dataclass
class DatasetSpec:
    name: str
    annotation: str  # absolute path of the .jsonl / .json file
    root: str  # absolute data root that media paths are relative to
    repeat: float = None
    ratio: float = None
    index_stem: str = None  # where this dataset's index files go, without the "-L<max length>" suffix


INDEX_FOLDER = ".longvl-index"  # inside the mixture's folder, unless a cache folder is given


@dataclass
class Mixture:
    datasets: list
    samples_per_epoch: int = None  # only used with ratios; default: total size of the datasets

    def draw_counts(self, sizes):
        """Number of draws per dataset in one epoch, given each dataset's number of usable samples."""
        if len(sizes) != len(self.datasets):
            raise ValueError(f"got {len(sizes)} dataset sizes for {len(self.datasets)} datasets")
        if self.datasets[0].ratio is None:
            return [int(round(d.repeat * n)) for d, n in zip(self.datasets, sizes)]
        total = self.samples_per_epoch or sum(sizes)
        ratio_sum = sum(d.ratio for d in self.datasets)
        return [int(round(total * d.ratio / ratio_sum)) if n else 0 for d, n in zip(self.datasets, sizes)]

    def epoch_draws(self, usable, seed, epoch):
        """Shuffled (dataset, record) pairs of one epoch; `usable[d]` lists dataset d's good record indices.

        Each dataset contributes whole seeded permutations, then a seeded partial one, so every sample is
        drawn floor or ceil of its expected count -- never a lucky or unlucky sample.
        """
        rng = np.random.default_rng([seed, epoch])
        parts = []
        for d, (count, records) in enumerate(zip(self.draw_counts([len(u) for u in usable]), usable)):
            records = np.asarray(records, dtype=np.int64)
            if count == 0 or len(records) == 0:
                continue
            full, rest = divmod(count, len(records))
            chosen = [rng.permutation(records) for _ in range(full)] + [rng.permutation(records)[:rest]]
            picks = np.concatenate(chosen)
            parts.append(np.stack([np.full(len(picks), d, dtype=np.int64), picks], axis=1))
        if not parts:
            return np.zeros((0, 2), dtype=np.int64)
        draws = np.concatenate(parts)
        return draws[rng.permutation(len(draws))]


def _index_stem(name, annotation, base, index_dir):
    """`<index_dir>/<name>-<hash>`: the name keeps only [A-Za-z0-9_-] (no dots, no separators); the hash of
    the annotation's path (relative to the data folder, so moving the folder keeps the index; absolute in
    a cache folder, which several data folders may share) keeps datasets apart."""
    key = os.path.relpath(annotation, base) if index_dir is None else annotation
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:64] or "dataset"
    return os.path.join(index_dir or os.path.join(base, INDEX_FOLDER), f"{safe}-{digest}")


def _dataset_from(entry, base, default_name, index_dir):
    if not isinstance(entry, dict):
        raise ValueError(f"mixture entry {default_name!r} must be a mapping, got {entry!r}")
    annotation = entry.get("annotation", entry.get("path"))
    if annotation is None:
        raise ValueError(f"mixture entry {default_name!r} needs 'annotation' (or 'path')")
    repeat = entry.get("repeat", entry.get("repeat_time"))
    ratio = entry.get("ratio")
    if repeat is not None and ratio is not None:
        raise ValueError(f"mixture entry {default_name!r}: give 'repeat' or 'ratio', not both")
    if repeat is None and ratio is None:
        repeat = 1.0
    for key, value in (("repeat", repeat), ("ratio", ratio)):
        if value is not None and (not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"mixture entry {default_name!r}: {key} must be a number >= 0, got {value!r}")
    if not isinstance(annotation, str) or not isinstance(entry.get("root", "."), str):
        raise ValueError(f"mixture entry {default_name!r}: 'annotation' and 'root' must be paths")
    name = str(entry.get("name", default_name))
    annotation = os.path.abspath(os.path.join(base, annotation))
    return DatasetSpec(
        name=name,
        annotation=annotation,
        root=os.path.abspath(os.path.join(base, entry.get("root", "."))),
        repeat=None if repeat is None else float(repeat),
        ratio=None if ratio is None else float(ratio),
        index_stem=_index_stem(name, annotation, base, index_dir),
    )


def load_mixture(path, cache_dir=None):
    """Read a mixture file; relative annotation and root paths are taken from the file's folder.

    Index files go to `<the file's folder>/.longvl-index/`, or to `cache_dir` when given."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mixture file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    base = os.path.dirname(os.path.abspath(path))
    index_dir = None if cache_dir is None else os.path.realpath(cache_dir)
    if isinstance(raw, dict) and "datasets" in raw:
        entries, samples_per_epoch = raw["datasets"], raw.get("samples_per_epoch")
    elif isinstance(raw, dict):  # InternVL meta json: {name: {root, annotation, repeat_time}}
        entries, samples_per_epoch = [dict(v, name=k) for k, v in raw.items()], None
    else:
        raise ValueError(f"{path}: expected a mapping with a 'datasets' list")
    if not entries:
        raise ValueError(f"{path}: the mixture lists no datasets")
    datasets = [_dataset_from(e, base, f"dataset{i}", index_dir) for i, e in enumerate(entries)]
    if len({d.ratio is None for d in datasets}) != 1:
        raise ValueError(f"{path}: use 'ratio' for every dataset or for none (others use 'repeat')")
    if len({d.name for d in datasets}) != len(datasets):
        raise ValueError(f"{path}: dataset names must be unique")
    return Mixture(datasets, samples_per_epoch)
