"""--load_balance end to end on 2 ranks (plugin ep: E 4 experts, 2 per rank), two launches:

1. train.py through `colossalai run` from a checkpoint whose router sends most tokens to experts 0 and 1 (both on
   EP rank 0): 5 steps, a rebalance after step 3, a checkpoint after every step.
2. this file as a torchrun worker, which rebuilds the same trainer objects and, starting from run 1's checkpoints,
   repeats step 3 and the rebalance in process to look inside it (the optimizer's fp32 shards, logits), continues
   without rebalancing as the baseline, and resumes from the checkpoint saved right after the rebalance:

       torchrun --nproc_per_node 2 tests/parallel/test_load_balance_dist.py WORK_DIR [train.py options]
"""

import os
import shutil
import sys

import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.moe import OpenMoeSparseMLP
from tests.helpers import ROOT

ARGS = ["--tokenizer", "tests/assets/tokenizer", "--load_balance", "--load_balance_interval", "3", "--max_steps", "5",
        "--save_interval", "1",
        "--keep_last", "10", "--no-tensorboard", "--batch_size", "4", "--max_length", "48", "--warmup_steps", "2",
        "--lr", "3e-3"]
PARAMS = ("gate_weight", "experts.wi_gate", "experts.wi_up", "experts.wo")  # per MoE layer: what moves


def sample_batch() -> dict[str, torch.Tensor]:
    """32 examples of the training data, as train.py pads them."""
    from openmoe import data

    tokenizer = data.load_tokenizer(os.path.join(ROOT, "tests/assets/tokenizer"))
    records = data.load_records(os.path.join(ROOT, "data/sample/train.jsonl")).select(range(32))
    return data.collate(data.tokenize_examples(records, tokenizer, 48), 0, 48)


def skewed_checkpoint(directory, batch) -> None:
    """The seed-42 tiny model with gate rows 0 and 1 tilted towards the mean router input of real data: about 80%
    of the router choices then go to experts 0 and 1, i.e. to EP rank 0."""
    torch.manual_seed(42)
    model = OpenMoeForCausalLM(preset("tiny"))
    for layer in (m for m in model.modules() if isinstance(m, OpenMoeSparseMLP)):
        seen = []
        hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0][args[1].bool()].float()))
        with torch.no_grad():
            model(**batch)
            hook.remove()
            mean = seen[0].mean(0)  # [H] over real tokens
            layer.gate_weight[:2] += 2.0 * mean / mean.norm() ** 2
    model.save_pretrained(str(directory))


def test_rebalance_moves_experts_with_their_optimizer_state_and_survives_resume(tmp_path):
    from tests.helpers import colossalai_run, metrics, torchrun

    batch = sample_batch()
    skewed_checkpoint(tmp_path / "skewed", batch)
    args = ["--pretrained", str(tmp_path / "skewed"), *ARGS]
    full = tmp_path / "full"
    res = colossalai_run(2, *args, "--output_path", str(full))
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "done: 5 steps" in log, log[-4000:]
    m = metrics(full)
    # the skew is real: rank 0 (experts 0, 1) gets most of step 1's tokens in both MoE layers
    for counts in m[0]["tokens_per_expert"]:
        assert sum(counts[:2]) > 0.7 * sum(counts), counts
    # step 3's record: per-layer EP-rank loads before/after and the swaps, on stdout too
    moves = m[2]["rebalance"]
    assert [r["layer"] for r in moves] == [0, 1] and all(r["swaps"] for r in moves), moves
    for r in moves:
        assert max(r["rank_loads_after"]) < 0.65 * max(r["rank_loads_before"]), r
        assert sum(r["rank_loads_after"]) == sum(r["rank_loads_before"])
    assert m[2]["rank_load_max_over_mean_before"] > 1.4 > 1.1 > m[2]["rank_load_max_over_mean_after"]
    assert "step 3: expert rebalance: model.layers.1.mlp: EP-rank load max/mean" in log, log[-3000:]
    assert all("rebalance" not in r for r in m[:2] + m[3:])
    # logged counts stay logical: experts 0 and 1 are still the busy ones after they were split over two ranks
    for counts in m[3]["tokens_per_expert"]:
        assert min(counts[:2]) > max(counts[2:]), counts
    placement = torch.load(full / "checkpoints" / "step-00000003" / "expert_placement.pt")
    assert placement["slots"].tolist() != [[0, 1, 2, 3]] * 2 and not placement["counts"].any()
    # the export is in the published (logical) order: on one device experts 0 and 1 still take most tokens
    exported = OpenMoeForCausalLM.from_pretrained(str(full / "hf"))
    with torch.no_grad():
        for aux in exported(**batch).moe:
            assert min(aux.tokens_per_expert[:2]) > max(aux.tokens_per_expert[2:]), aux.tokens_per_expert

    work = tmp_path / "work"
    for name, step in (("pre", 2), ("post", 3)):  # run 1 as if it had stopped after step 2 / step 3
        shutil.copytree(full / "checkpoints" / f"step-{step:08d}", work / name / "checkpoints" / f"step-{step:08d}")
    torchrun(2, "tests/parallel/test_load_balance_dist.py", str(work), str(full), *args)
    r = torch.load(work / "result.pt")
    losses = [x["loss"] for x in m]
    assert r["step3"] == losses[2]  # resumed from step 2: bitwise the run's step 3
    # the in-process rebalance did exactly what train.py's did: same placement, same optimizer shards on each rank
    assert r["slots"] == placement["slots"].tolist() and r["same_shards_as_train_py"]
    # moved data is copied, never recomputed: each slot's weights, fp32 master and both Adam moments are bitwise the
    # ones its expert had before the move (and the gate's rows followed), and the logical state dict is unchanged
    assert r["moved_exactly"] == {(layer, p, t): True for layer in range(2) for p in PARAMS
                                  for t in ("working", "master", "exp_avg", "exp_avg_sq")}, r["moved_exactly"]
    assert r["logical_state_dict_unchanged"]
    # same function on permuted storage: expert and attention arithmetic is identical; only the router's reductions
    # over E (softmax denominator, aux loss) change order, i.e. fp32 ulps, which can flip the bf16 rounding of a
    # combine weight. Hence a tolerance far below any real change (one moved row would shift logits by ~1e-1).
    (loss_before, logits_before), (loss_after, logits_after) = r["probe_before"], r["probe_after"]
    assert abs(loss_after - loss_before) < 1e-4 * abs(loss_before), (loss_before, loss_after)
    assert (logits_after - logits_before).abs().max() < 2e-3
    # training goes on as without balancing (the same arithmetic up to fp32 reduction order), and train.py's own
    # steps 4-5 after its rebalance are bitwise the in-process ones
    assert r["balanced"] == losses[3:5]
    for a, b in zip(r["balanced"], r["plain"]):
        assert abs(a - b) < 1e-3, (r["balanced"], r["plain"])
    # resuming from the checkpoint written right after the rebalance restores the moved layout and the next step
    assert r["resume_restores_layout"]
    assert r["resumed_step4"] == losses[3]


# ---------------------------------------------------------------- torchrun worker (launch 2)
def worker(work: str, full: str, argv: list[str]) -> None:
    import torch.distributed as dist

    from openmoe.backend.colossal import master_params, shard_copies
    from openmoe.parallel.gather import full_state_dict, moe_layers
    from openmoe.parallel.load_balance import rebalance
    from openmoe.train.builder import build
    from openmoe.train.checkpointing import load_checkpoint, save_checkpoint
    from openmoe.train.config import parse_args
    from openmoe.train.trainer import Trainer
    from tests.parallel.roundtrip_worker import probe_batch

    run = parse_args([*argv, "--output_path", os.path.join(work, "pre")])
    st = build(run)  # train.py's setup
    rank, device, cfg, batches, placement = st.rank, st.device, st.cfg, st.batches, st.placement
    model, optimizer = st.model, st.optimizer
    layers = moe_layers(model)
    loop = Trainer(st, hooks=[])

    def resume(name):
        _, data_state, _ = load_checkpoint(st, output_path=name)
        batches.load_state_dict(data_state)
        return iter(batches)

    def step(it) -> float:  # train.py's step (its hooks aside)
        result = loop.step(1, it)
        assert result.applied
        return result.stats.loss

    def probe():
        ids = probe_batch(cfg.vocab_size).to(device)
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids, return_logits=True)
        return out.loss.item(), out.logits.float().cpu()

    def physical():  # (layer, param, copy) -> full [E, ...] tensor in slot order, on every rank
        out = {}
        for i, layer in enumerate(layers):
            for name in PARAMS:
                p = layer.get_parameter(name)
                master = optimizer.working_to_master_param[id(p)]
                copies = {"working": p.data.float(), "master": master, **{
                    k: v for k, v in optimizer.optim.state[master].items() if k.startswith("exp_avg")}}
                for kind, t in copies.items():
                    out[i, name, kind] = gather(t, p, optimizer, layer if name != "gate_weight" else None)
        return out

    base = os.path.join(work, "base")
    it = resume(os.path.join(work, "pre"))
    step3 = step(it)
    save_checkpoint(st, 3, output_path=base)
    plain = [step(it) for _ in range(2)]  # baseline: no rebalance

    it = resume(base)  # back to the end of step 3, placement counts included
    probe_before, phys_before = probe(), physical()
    sd_before = full_state_dict(model, placement)
    rebalance(layers, placement, shard_copies(optimizer))
    probe_after, phys_after = probe(), physical()
    sd_after = full_state_dict(model, placement)
    slots = placement.slots.tolist()
    moved_exactly = {key: torch.equal(phys_after[key], phys_before[key][torch.tensor(slots[key[0]])])
                     for key in phys_before}
    local_after = {k: v.clone() for k, v in model.unwrap().state_dict().items()}
    saved = torch.load(os.path.join(full, "checkpoints", "step-00000003", f"optimizer-rank{rank:05d}.pt"),
                       weights_only=False)
    same_shards = all(torch.equal(a, b) for a, b in zip(master_params(optimizer), saved["masters"],
                                                        strict=True))
    state = optimizer.optim.state_dict()["state"]
    same_shards &= all(torch.equal(state[i][k], saved["optim"]["state"][i][k]) for i in state
                       for k in ("exp_avg", "exp_avg_sq"))
    balanced = [step(it) for _ in range(2)]

    placement.reset()  # as in a fresh process: the layout must come from the checkpoint
    it = resume(os.path.join(work, "post"))
    restored = all(torch.equal(v, local_after[k]) for k, v in model.unwrap().state_dict().items())
    restored &= placement.slots.tolist() == slots
    resumed_step4 = step(it)

    flags = torch.tensor([float(same_shards), float(restored)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # every rank's shards and layout
    if rank == 0:
        torch.save({"step3": step3, "plain": plain, "balanced": balanced, "resumed_step4": resumed_step4,
                    "slots": slots, "moved_exactly": moved_exactly, "same_shards_as_train_py": bool(flags[0]),
                    "resume_restores_layout": bool(flags[1]), "probe_before": probe_before,
                    "probe_after": probe_after,
                    "logical_state_dict_unchanged": all(torch.equal(sd_before[k], sd_after[k]) for k in sd_before)},
                   os.path.join(work, "result.pt"))
    dist.destroy_process_group()


def gather(t: torch.Tensor, p: torch.nn.Parameter, optimizer, ep_layer=None) -> torch.Tensor:
    """The full tensor of which `t` is this rank's flat ZeRO shard (or, for the working copy, all of it) in p's
    shape; expert tensors then concatenated over the EP group (slot order)."""
    import torch.distributed as dist

    store = optimizer.pid_to_bucket_store[id(p)]
    if t.numel() != p.numel():  # a shard of the padded flat tensor
        parts = [torch.empty_like(t) for _ in range(store.world_size)]
        dist.all_gather(parts, t.contiguous(), group=store.torch_pg)
        t = torch.cat(parts)[:p.numel()]
    t = t.reshape(p.shape).float()
    if ep_layer is not None:
        parts = [torch.empty_like(t) for _ in range(ep_layer.ep_size)]
        dist.all_gather(parts, t.contiguous(), group=ep_layer.ep_group)
        t = torch.cat(parts)
    return t


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3:])
