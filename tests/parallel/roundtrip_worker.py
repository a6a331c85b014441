"""Train a few steps with a plugin, then export the HF-format checkpoint and save the parallel model's eval logits
on a fixed batch (data-parallel rank 0; with a pipeline, its last stage) and, when the run has an eval set, its
eval metrics, for tests/parallel/test_train_cli.py:

    torchrun --nproc_per_node 2 tests/parallel/roundtrip_worker.py OUT_DIR --plugin ep [train.py options]
    torchrun --nproc_per_node 4 tests/parallel/roundtrip_worker.py OUT_DIR --plugin hybrid --pp_size 2 --ep_size 2
"""

import os
import sys

import torch
import torch.distributed as dist

from openmoe.backend.colossal import dp_rank
from openmoe.parallel.gather import full_state_dict
from openmoe.train.builder import build
from openmoe.train.checkpointing import export_hf
from openmoe.train.config import parse_args
from openmoe.train.evaluate import evaluate
from openmoe.train.lora import export_lora
from openmoe.train.trainer import Trainer


def probe_batch(vocab: int) -> torch.Tensor:
    ids = torch.randint(2, vocab, (2, 16), generator=torch.Generator().manual_seed(7))
    ids[:, 0] = 0
    return ids


def main():
    out_dir, argv = sys.argv[1], sys.argv[2:]
    run = parse_args(argv + ["--output_path", out_dir, "--no-tensorboard"])
    st = build(run)  # data, model, optimizer and boost exactly as train.py
    Trainer(st, hooks=[]).train()  # train.py's loop, without logging and checkpoints
    st.model.eval()
    with torch.no_grad():
        logits = probe_logits(st.model, st.booster, probe_batch(st.cfg.vocab_size).to(st.device))
    metrics = evaluate(st) if st.eval_examples is not None else None  # collective
    if run.lora.lora_rank:
        export_lora(st, out_dir)  # adapter/, and hf/ merged with --merge_lora
        frozen = full_state_dict(st.model)
        if st.rank == 0:  # every weight but the adapters, as trained (the test compares them with the init)
            torch.save({k: v for k, v in frozen.items() if ".lora_" not in k}, os.path.join(out_dir, "frozen.pt"))
    else:
        export_hf(st, os.path.join(out_dir, "hf"))
    if logits is not None and dp_rank(st.boosted.plugin) == 0:
        torch.save(logits, os.path.join(out_dir, "logits.pt"))
    if metrics is not None and st.rank == 0:
        torch.save(metrics, os.path.join(out_dir, "eval.pt"))
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
