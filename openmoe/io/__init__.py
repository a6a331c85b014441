"""Reading and writing checkpoints: `hf` (HF-format model directories: one atomic-directory protocol, one shard
writer) and `resumable` (training checkpoints: model, optimizer, scheduler, data position, RNG). Never imports
colossalai: optimizer state arrives as plain state objects built by `openmoe.backend`."""
