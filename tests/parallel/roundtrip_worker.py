"""Train a few steps with a plugin, then export the HF-format checkpoint and save the parallel model's eval logits
on a fixed batch (data-parallel rank 0; with a pipeline, its last stage), for tests/parallel/test_train_cli.py:

    torchrun --nproc_per_node 2 tests/parallel/roundtrip_worker.py OUT_DIR --plugin ep [train.py options]
    torchrun --nproc_per_node 4 tests/parallel/roundtrip_worker.py OUT_DIR --plugin hybrid --pp_size 2 --ep_size 2
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
        trainer.train_step(model, booster, optimizer, it, 1, device)  # (outputs, applied)
        scheduler.step()
    model.eval()
    with torch.no_grad():
        logits = probe_logits(model, booster, probe_batch(cfg.vocab_size).to(device))
    trainer.export_hf(model, cfg, tokenizer, os.path.join(out_dir, "hf"))
    if logits is not None and dist.get_rank(plugin.dp_group) == 0:
        torch.save(logits, os.path.join(out_dir, "logits.pt"))
    dist.destroy_process_group()


def probe_logits(model, booster, ids):
    """Eval logits [B, S, V] of the parallel model; with a pipeline, a forward-only pass whose logits only the last
    stage holds (None on the other stages)."""
    if booster.plugin.stage_manager is None:
        return model(input_ids=ids).logits.float().cpu()
    logits = []

    def criterion(out, micro_batch):
        logits.append(out.logits.float().cpu())
        return out.logits.new_zeros(())

    booster.execute_pipeline(iter([{"input_ids": ids}]), model, criterion, optimizer=None, return_loss=False)
    return torch.cat(logits) if logits else None


if __name__ == "__main__":
    main()
