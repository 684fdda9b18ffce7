"""World -> data parallel x context parallel (Ulysses x ring) device meshes, rebuilt for every stage.

FSDP2 shards parameters over every rank (dp x cp, as torchtitan's dp_shard_cp): that product is always the
world, so the sharded model is built once and survives stage changes. What changes per stage is how ranks
group for context parallelism: `StageMesh.cp` holds the ranks that share one packed sequence, neighbours
first (longvl.parallel.mesh), so its Ulysses sub-groups (fast links) are contiguous and ring steps stride across them.
"""
from __future__ import annotations

import atexit
import dataclasses
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from longvl.parallel.mesh import CPGroups, init_cp_mesh


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (or a world of one without torchrun); return rank, world, device.

    gloo on CPU; nccl plus gloo (for CPU tensors) on GPU. Without torchrun's environment a single process
    initialises a world of one, so `python -m longvl.eagle.train` works as is.
    """
    if not dist.is_initialized():
        # CPU tensors keep a gloo path on GPU machines too: optimizer-step offload and async checkpoints need it.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:   # a world of one: a store in a private file, no port to pick (and to race other processes for)
            import tempfile

            store = tempfile.NamedTemporaryFile(prefix="longvl_world_", delete=False)
            store.close()
            atexit.register(os.remove, store.name)
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group(backend, init_method=f"file://{store.name}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


@dataclasses.dataclass
class StageMesh:
    """parallel/'s ("dp", "ring", "ulysses") mesh of one stage and this rank's CP groups."""
    mesh: DeviceMesh
    groups: CPGroups
    dp: int
    cp: int

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.groups.cp

    @property
    def cp_rank(self) -> int:
        return self.groups.rank

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")


def build_fsdp_mesh(world: int) -> DeviceMesh:
    return init_device_mesh(device_type(), (world,), mesh_dim_names=("dp_cp",))


def build_stage_mesh(fsdp_mesh: DeviceMesh, cp: int, ulysses: int = 1) -> StageMesh:
    """Split the world into dp groups of `cp` neighbouring ranks; raise when `cp` does not divide the world."""
    world = fsdp_mesh.size()
    if cp < 1 or world % cp:
        raise ValueError(f"context-parallel degree {cp} must divide the world size {world}")
    mesh, groups = init_cp_mesh(device_type(), cp, ulysses)
    return StageMesh(mesh=mesh, groups=groups, dp=world // cp, cp=cp)
