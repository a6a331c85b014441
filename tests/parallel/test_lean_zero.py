"""--lean_zero (openmoe/backend/colossal.py lean_zero1: reduce-scatter after the last backward, the optimizer step on
flat buffers) against colossalai's own ZeRO-1 reduction and step, on 2 gloo ranks through the trainer's `build` and
`forward_backward`: plugin `ep` (EP 2, ZeRO-1; the dense parameters reduced over 2 ranks, the experts over a one-rank
group), bf16, capacity-routed bmm experts (the grouped GEMM needs 16-byte strides: hidden 63 is refused there),
2 micro-batches per step, AdamW with gradient clipping active, 2 steps, and between them the experts move between the
EP ranks by the first step's load (--load_balance's rebalance: weights, fp32 master shards and moments), so the second
step shows the lean step reading what the move left.

    .venv/bin/python -m pytest tests/parallel/test_lean_zero.py -q      # ~20 s on 2 cores (one 2-rank launch)

hidden_size 63 and vocab 1001 give every dense parameter an odd size (ZeRO pads its last chunk), and a bucket of
5,000 elements cuts the reduce-scatters and all-gathers into many buckets with the embedding alone in one larger
than the limit (and the inner optimizer step runs over buckets of 20,000). The reduced gradients must be equal (for
2 ranks a+b is the same sum in both, and halving is exact); the clipping norm reads the bf16 shards instead of
their fp32 copies (same values, fp32 accumulation), and the casts round as colossalai's do: on the CPU the losses,
gradients, norms and the weights after 2 steps come out bit-equal. Then train_step with the bf16 finiteness check,
through the run option: a NaN gradient on one rank's own expert skips the step on both ranks in both paths.
"""

import os
import sys

import pytest
import torch

from tests.helpers import micro_batches, torchrun

STEPS, B, S, CLIP = 2, 2, 32, 0.05


def batches(step: int, rank: int, vocab: int) -> list[dict]:
    return micro_batches(step, rank, vocab, B, S)  # grad_accum 2


def train(lean) -> dict:
    """lean: False (colossalai's ZeRO-1), True (lean_zero1), "kernel" (lean_zero1 with the AdamW pass of
    openmoe/optim_kernels.py: its torch path on the CPU)."""
    import torch.distributed as dist

    from openmoe.backend.colossal import lean_zero1, local_gradients, shard_copies
    from openmoe.config import preset
    from openmoe.parallel.gather import moe_layers
    from openmoe.parallel.load_balance import rebalance
    from openmoe.train.builder import build
    from openmoe.train.config import RunConfig
    from openmoe.train.step import count_expert_load, forward_backward, to_device

    run = RunConfig.from_flat(model_name="tiny", plugin="ep", batch_size=B, grad_accum=2, max_length=S,
                              precision="bf16", zero_stage=1, lr=1e-2, load_balance=True,
                              grad_clip=CLIP, warmup_steps=1, lr_schedule="constant", max_steps=STEPS, seed=0,
                              tensorboard=False, lean_zero=False, adamw_kernel=False)  # colossalai's step (not auto)
    st = build(run, training=False, config=preset("tiny", hidden_size=63, vocab_size=1001))
    assert not hasattr(st.optimizer, "_openmoe_lean_step")
    if lean:  # small buckets: see the module docstring
        lean_zero1(st.optimizer, bucket_elems=5000, step_bucket_elems=20000, adamw_kernel=lean == "kernel")
    st.model.train()
    got = {"loss": [], "grads": [], "norm": [], "odd": 0, "empty_slots": 0, "swaps": 0}
    for step in range(STEPS):
        outs = forward_backward(st.model, st.booster, st.optimizer,
                                to_device(batches(step, dist.get_rank(), st.cfg.vocab_size), st.device))
        got["loss"].append([float(o.loss) for o in outs])
        got["grads"].append([g.float().clone() for g in local_gradients(st.model, st.optimizer)])
        # the lean reduction leaves the other rank's slot of each dense gradient empty (colossalai's holds it)
        got["empty_slots"] = sum(g is None for store in st.optimizer.pg_to_grad_store.values()
                                 for group in store._grads_of_params.values() for gs in group.values() for g in gs)
        st.optimizer.step()
        got["norm"].append(float(st.optimizer.get_grad_norm()))
        st.optimizer.zero_grad()
        count_expert_load(outs, st.device, None, st.placement)
        if step == 0:
            got["masters_step1"] = [m.detach().clone() for g in st.optimizer._master_param_groups_of_current_rank
                                    for m in st.optimizer._master_param_groups_of_current_rank[g]]
            moves = rebalance(moe_layers(st.model), st.placement, shard_copies(st.optimizer))
            got["swaps"] = sum(len(m.swaps) for m in moves)
    got["params"] = {n: p.detach().float().clone() for n, p in st.model.unwrap().named_parameters()}
    opt = st.optimizer
    pairs = [(w, m) for g in opt._working_param_groups for w, m in zip(opt._working_param_groups[g],
                                                                         opt._master_param_groups_of_current_rank[g])]
    got["masters"] = [m.detach().clone() for _, m in pairs]
    # every one-rank group's working weights are its fp32 master rounded to bf16 (the kernel path writes them itself)
    one_rank = [(w, m) for w, m in pairs if dist.get_world_size(opt.param_to_pg[w]) == 1]
    got["one_rank_written"] = len(one_rank) > 0 and all(torch.equal(w.data.view(-1), m.to(w.dtype))
                                                         for w, m in one_rank)
    got["odd"] = sum(p.numel() % 2 for p in st.model.unwrap().parameters())
    return got


def skip_nonfinite(lean: bool) -> dict:
    """train_step with the bf16 finiteness check, the lean step through the run option: step 1 gets a NaN in one
    expert weight's gradient on rank 1 only (the experts' ZeRO group has one rank, so rank 0 never sees it unless
    the vote carries it); every rank must skip that step and leave the weights alone."""
    import torch.distributed as dist

    from openmoe.config import preset
    from openmoe.train.builder import build
    from openmoe.train.config import RunConfig
    from openmoe.train.step import train_step

    run = RunConfig.from_flat(model_name="tiny", plugin="ep", batch_size=B, grad_accum=2, max_length=S,
                              precision="bf16", zero_stage=1, lr=1e-2, grad_clip=CLIP, warmup_steps=1,
                              lr_schedule="constant", max_steps=3, seed=0, tensorboard=False, lean_zero=lean,
                              adamw_kernel=False)
    st = build(run, training=False, config=preset("tiny", hidden_size=63, vocab_size=1001))
    st.model.train()
    rank, model = dist.get_rank(), st.model.unwrap()
    weights = lambda: {n: p.detach().float().clone() for n, p in model.named_parameters()}
    expert = next(p for n, p in model.named_parameters() if "experts" in n)
    applied, unchanged = [], None
    for step in range(3):
        hook = expert.register_hook(lambda g: g * float("nan")) if step == 1 and rank == 1 else None
        before = weights()
        _, ok = train_step(st.model, st.booster, st.optimizer, iter(batches(step, rank, st.cfg.vocab_size)), 2,
                           st.device, check_grads=True)
        applied.append(ok)
        if step == 1:
            unchanged = all(torch.equal(w, before[n]) for n, w in weights().items())
        if hook is not None:
            hook.remove()
    return {"applied": applied, "unchanged": unchanged, "params": weights(), "lean": hasattr(st.optimizer,
                                                                                             "_openmoe_lean_step")}


def main():
    import torch.distributed as dist

    from openmoe.backend.colossal import init_distributed

    rank, _, _ = init_distributed(seed=0)
    results = {lean: train(lean) for lean in (False, True, "kernel")}
    results["skip"] = {lean: skip_nonfinite(lean) for lean in (False, True)}
    torch.save(results, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both ranks' results of one 2-rank launch (every comparison below reads them)."""
    out = tmp_path_factory.mktemp("lean_zero")
    torchrun(2, "tests/parallel/test_lean_zero.py", str(out), timeout=600)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_lean_zero_equals_colossalai_zero1(results):
    for res in results:
        ref, lean = res[False], res[True]
        assert ref["odd"] > 0  # some parameter is padded by ZeRO
        assert lean["swaps"] == ref["swaps"] > 0  # experts moved between the steps (the same plan in both)
        assert ref["empty_slots"] == 0 and lean["empty_slots"] > 0  # each ran its own reduction
        assert lean["loss"] == ref["loss"]  # the first step's losses, and the second's after one update
        for g_ref, g_lean in zip(ref["grads"], lean["grads"], strict=True):
            assert len(g_ref) == len(g_lean) > 0
            for a, b in zip(g_ref, g_lean, strict=True):
                assert torch.equal(a, b)  # the same reduced gradient shards, in the same order
        assert ref["norm"][0] > CLIP  # clipping active
        assert lean["norm"] == ref["norm"]
        assert ref["params"].keys() == lean["params"].keys()
        for name, w in ref["params"].items():
            assert torch.equal(lean["params"][name], w), name


def test_adamw_kernel_step_equals_torch_fused_adamw(results):
    """--adamw_kernel's step (bf16 shards read directly, one-rank groups written in the same pass) against the lean
    step with torch's fused AdamW: the same arithmetic in another op order, so after the first step (same gradients)
    the fp32 masters agree to a few ulps. The second step, after a move of experts (the kernel's optimizer state
    moves with them), starts from bf16 weights that may differ by one rounding; Adam's update of a near-zero gradient
    is about +-lr whatever its size, so there the check is loss and weights within 2 lr."""
    for res in results:
        lean, kernel = res[True], res["kernel"]
        assert kernel["loss"][0] == lean["loss"][0] and kernel["swaps"] == lean["swaps"] > 0
        assert kernel["one_rank_written"] and lean["one_rank_written"]
        # step 1 sees the same gradients; step 2 those of weights that may differ by one bf16 rounding
        assert kernel["norm"][0] == lean["norm"][0] and kernel["norm"][1] == pytest.approx(lean["norm"][1], rel=1e-3)
        for got, want in zip(kernel["masters_step1"], lean["masters_step1"], strict=True):
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-8)
        assert kernel["loss"][1] == pytest.approx(lean["loss"][1], rel=1e-3)
        for got, want in zip(kernel["masters"], lean["masters"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-2)  # lr 1e-2


def test_lean_zero_skips_a_non_finite_step_on_every_rank(results):
    """The finiteness vote inside the lean step (train_step with check_grads): a NaN gradient on one rank's own
    expert skips the step on both ranks, as the separate vote of colossalai's path does, and the next step runs;
    the weights after it equal the reference path's."""
    for res in results:
        ref, lean = res["skip"][False], res["skip"][True]
        assert lean["lean"] and not ref["lean"]
        assert ref["applied"] == lean["applied"] == [True, False, True]
        assert ref["unchanged"] and lean["unchanged"]
        for name, w in ref["params"].items():
            assert torch.equal(lean["params"][name], w), name


if __name__ == "__main__":
    main()
