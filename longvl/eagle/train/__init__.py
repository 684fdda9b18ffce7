"""The progressive long-context trainer (`python -m longvl.eagle.train --config demo`): config, meshes, checkpoints,
metrics, activation offload and the training loop over FSDP2 x context parallelism."""
