"""Process groups for context parallelism, as a DeviceMesh that FSDP2 can share.

Mesh dims ("dp", "ring", "ulysses"), row-major, so Ulysses ranks are neighbours (the all-to-all stays on
the fastest links) and ring ranks are strided. The flattened view "cp" = ring x ulysses is the
context-parallel group (CP rank = ring_rank * ulysses + ulysses_rank, the order `sharding` uses).
"""
import dataclasses

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclasses.dataclass
class CPGroups:
    """The context-parallel process groups of this rank."""
    cp: dist.ProcessGroup
    ring: dist.ProcessGroup
    ulysses: dist.ProcessGroup
    ring_size: int
    ulysses_size: int

    @property
    def size(self):
        return self.ring_size * self.ulysses_size

    @property
    def rank(self):
        return dist.get_rank(self.cp)


def init_cp_mesh(device_type, cp_size, ulysses_size=1, dp_size=None) -> tuple[DeviceMesh, CPGroups]:
    """Build the (dp, ring, ulysses) mesh over all ranks and return it with this rank's CP groups."""
    world = dist.get_world_size()
    dp_size = dp_size or world // cp_size
    if dp_size * cp_size != world or cp_size % ulysses_size:
        raise ValueError(f"dp {dp_size} x cp {cp_size} must equal the world size {world}, and ulysses "
                         f"{ulysses_size} must divide cp")
    ring_size = cp_size // ulysses_size
    mesh = init_device_mesh(device_type, (dp_size, ring_size, ulysses_size),
                            mesh_dim_names=("dp", "ring", "ulysses"))
    cp_mesh = mesh["ring", "ulysses"]._flatten("cp")
    groups = CPGroups(cp_mesh.get_group(), mesh["ring"].get_group(), mesh["ulysses"].get_group(), ring_size,
                      ulysses_size)
    return mesh, groups
