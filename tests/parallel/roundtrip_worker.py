"""Train a few steps with a plugin, then export the HF-format checkpoint and save the parallel model's eval logits
on a fixed batch (rank 0), for tests/parallel/test_train_cli.py:

    torchrun --nproc_per_node 2 tests/parallel/roundtrip_worker.py OUT_DIR --plugin ep [train.py options]
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from openmoe import trainer  # noqa: E402
from openmoe.parallel.plugins import build_plugin, fix_grad_clipping, resolve_sizes  # noqa: E402
from openmoe.run_config import parse_args  # noqa: E402


def probe_batch(vocab: int) -> torch.Tensor:
    ids = torch.randint(2, vocab, (2, 16), generator=torch.Generator().manual_seed(7))
    ids[:, 0] = 0
    return ids


def main():
    out_dir, argv = sys.argv[1], sys.argv[2:]
    run = parse_args(argv + ["--output_path", out_dir, "--no-tensorboard"])
    from colossalai.booster import Booster

    rank, world, device = trainer.init_distributed(run.seed)
    cfg = trainer.model_config(run)
    sizes = resolve_sizes(run, cfg, world)
    plugin = build_plugin(run, sizes)
    tokenizer, batches = trainer.build_data(run, cfg, dist.get_rank(plugin.dp_group), sizes.dp)
    model = trainer.build_model(run, cfg)
    optimizer, scheduler = trainer.build_optimizer(run, model, run.max_steps)
    booster = Booster(plugin=plugin)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    fix_grad_clipping(optimizer)
    it = iter(batches)
    model.train()
    for _ in range(run.max_steps):
        trainer.train_step(model, booster, optimizer, it, 1, device)
        scheduler.step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_batch(cfg.vocab_size).to(device)).logits.float().cpu()
    trainer.export_hf(model, cfg, tokenizer, os.path.join(out_dir, "hf"))
    if rank == 0:
        torch.save(logits, os.path.join(out_dir, "logits.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
