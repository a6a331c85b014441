"""train.py end to end through the real launcher, checkpoint round trips, resume, and bad-input errors."""

import math
import os
import shutil

import pytest
import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.io.resumable import CheckpointManager
from tests.helpers import colossalai_run, metrics, torchrun
from tests.parallel.roundtrip_worker import probe_batch

COMMON = ["--no-tensorboard", "--batch_size", "4", "--max_length", "48", "--warmup_steps", "2", "--lr", "3e-3"]


HYBRID = ["--pp_size", "2", "--ep_size", "2", "--microbatch_size", "2"]  # 2 stages x ep 2 on 4 ranks, 2 micro-batches


def train(nproc: int, out, *args: str) -> str:
    res = colossalai_run(nproc, *args, "--output_path", str(out), *COMMON)
    log = res.stdout + res.stderr
    # `colossalai run` exits 0 on its own usage errors: check what the script printed, not only the exit code
    assert res.returncode == 0 and "127.0.0.1: success" in log, log[-4000:]
    return log


def check_trained(out, log: str, plugin: str, nproc: int, steps: int = 24) -> None:
    assert f"plugin {plugin}: world {nproc}" in log and f"done: {steps} steps" in log
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, steps + 1))
    first, last = sum(r["loss"] for r in m[:3]) / 3, sum(r["loss"] for r in m[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert len(m[0]["tokens_per_expert"]) == 2 and len(m[0]["tokens_per_expert"][0]) == 4
    assert os.path.isfile(out / "checkpoints" / f"step-{steps:08d}" / "manifest.json")
    OpenMoeForCausalLM.from_pretrained(str(out / "hf"))


def zero_step_record(out, step: int) -> tuple[bool, bool]:
    """(lean_zero, adamw_kernel) in the run record of checkpoint `step`: what the run decided for the defaults."""
    run = CheckpointManager.read_trainer_state(str(out / "checkpoints" / f"step-{step:08d}"))["run"]
    return run["parallel"]["lean_zero"], run["kernels"]["adamw_kernel"]


def interrupted_copy(full, part, step: int) -> None:
    """`part` = the run `full` as if killed right after its step-`step` checkpoint: later checkpoints, the final
    export and later metrics removed."""
    shutil.copytree(full, part)
    for name in os.listdir(part / "checkpoints"):
        if int(name.split("-")[1]) > step:
            shutil.rmtree(part / "checkpoints" / name)
    shutil.rmtree(part / "hf")
    lines = open(part / "metrics.jsonl").read().splitlines()[:step]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def check_resumed(full, part, log: str, step: int, steps: int) -> None:
    assert "resumed from" in log and f"step-{step:08d} at step {step}" in log, log[-3000:]
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a[step:], b[step:]):
        assert ra["loss"] == rb["loss"], (ra["step"], ra["loss"], rb["loss"])  # bitwise on CPU


@pytest.mark.parametrize("plugin,nproc,extra", [("ep", 2, []), ("ep_zero", 4, ["--extra_dp_size", "2"])])
def test_train_via_colossalai_run_loss_decreases(plugin, nproc, extra, tmp_path):
    log = train(nproc, tmp_path / "run", "--plugin", plugin, *extra, "--max_steps", "24")
    check_trained(tmp_path / "run", log, plugin, nproc)
    # no --lean_zero / --adamw_kernel given: ZeRO-1 without a pipeline runs the lean step (the AdamW pass in torch
    # ops on the CPU), and the run records what it decided
    assert "optimizer step: lean ZeRO-1 with the AdamW kernel" in log, log[-3000:]
    assert zero_step_record(tmp_path / "run", 24) == (True, True)


HYBRID_RUN = ["--plugin", "hybrid", *HYBRID, "--max_steps", "12", "--save_interval", "6", "--keep_last", "5"]


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    """One pp 2 x ep 2 run of train.py (12 steps, checkpoints at 6 and 12), shared by the two tests below."""
    out = tmp_path_factory.mktemp("hybrid") / "full"
    return out, train(4, out, *HYBRID_RUN)


def test_hybrid_pipeline_trains(hybrid_run):
    out, log = hybrid_run
    check_trained(out, log, "hybrid", 4, steps=12)
    assert "in 2 micro-batches" in log
    assert "optimizer step: colossalai's ZeRO-1" in log  # the lean step's default is off with a pipeline
    assert zero_step_record(out, 12) == (False, False)


def test_hybrid_resume_continues_like_an_uninterrupted_run(hybrid_run, tmp_path):
    """Every stage's weights, optimizer shards and RNG come back: steps 7-12 repeat bitwise."""
    full, part = hybrid_run[0], tmp_path / "part"
    interrupted_copy(full, part, 6)
    check_resumed(full, part, train(4, part, *HYBRID_RUN, "--resume"), 6, 12)


EVAL = ["--eval_dataset", "data/sample/eval.jsonl", "--eval_samples", "11"]  # 11: the last eval batch is padded


@pytest.mark.parametrize("plugin,nproc,extra", [("ep", 2, []), ("hybrid", 4, HYBRID)])
def test_export_loads_on_one_device_with_same_logits(plugin, nproc, extra, tmp_path):
    torchrun(nproc, "tests/parallel/roundtrip_worker.py", str(tmp_path), "--plugin", plugin, *extra, "--max_steps", "3",
             *COMMON, *EVAL)
    check_eval_loss(tmp_path)
    if plugin == "ep":  # --eval_only on the export gives the same figure (printed to 4 decimals), writing no model
        res = colossalai_run(2, "--pretrained", str(tmp_path / "hf"), "--eval_only", *EVAL, "--max_length", "48",
                             "--output_path", str(tmp_path / "evalonly"))
        assert f"eval: loss {torch.load(tmp_path / 'eval.pt')['eval_loss']:.4f}," in res.stdout, res.stderr[-3000:]
        assert not (tmp_path / "evalonly" / "hf").exists()
    parallel_logits = torch.load(tmp_path / "logits.pt")
    model = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()  # bf16 weights, as trained
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        single = model(probe_batch(model.config.vocab_size)).logits
    # same bf16 weights and ops; only the expert batching differs (all-to-all buffers vs one buffer)
    assert (single - parallel_logits).abs().max() < 2e-2
    # every stage's experts really trained (the EP layer once dropped them from the optimizer)
    torch.manual_seed(42)
    init = OpenMoeForCausalLM(preset("tiny"))
    for layer in (1, 3):  # the MoE layers; with the pipeline, one on each stage
        moved = (model.model.layers[layer].mlp.experts.wi_up.float()
                 - init.model.layers[layer].mlp.experts.wi_up.bfloat16().float()).abs().max()
        assert moved > 1e-3, layer


def check_eval_loss(out) -> None:
    """The parallel run's eval loss == a single-process fp32 reference on the exported weights: label-smoothed
    cross-entropy (the config's smoothing, torch's formula) summed over every target token of the eval set, one
    unpadded example at a time, divided by the token count. At the tiny shape (4 experts, top-2, eval capacity factor
    2) no token is dropped, so batching does not change routing."""
    from openmoe.data import DataSpec, build_eval_examples, load_tokenizer

    got = torch.load(out / "eval.pt")
    model = OpenMoeForCausalLM.from_pretrained(str(out / "hf")).float().eval()
    spec = DataSpec(source="data/sample/train.jsonl", eval_source="data/sample/eval.jsonl", eval_samples=11,
                    max_length=48)
    examples = build_eval_examples(spec, load_tokenizer("tests/assets/tokenizer"))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"])
            logits = model(ids).logits[0, :-1].float()  # [S-1, V]: position t predicts token t+1
            target = labels[1:]
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum",
                                                       label_smoothing=model.config.label_smoothing).item()
            tokens += int((target != -100).sum())
    assert got["eval_tokens"] == tokens
    assert abs(got["eval_loss"] - total / tokens) < 1e-2 * total / tokens, (got, total / tokens)
    assert abs(got["eval_ppl"] - math.exp(got["eval_loss"])) < 1e-6 * got["eval_ppl"]


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    args = ["--plugin", "ep", "--max_steps", "8", "--save_interval", "4", "--keep_last", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert "done: 8 steps" in train(2, full, *args)
    interrupted_copy(full, part, 4)
    check_resumed(full, part, train(2, part, *args, "--resume"), 4, 8)


def test_offload_optimizer_trains_like_the_gpu_resident_step_and_resumes(tmp_path):
    """--offload_optimizer (ColossalAI's ZeRO cpu_offload: fp32 masters and Adam moments in host memory, AdamW on the
    host) with the lean step's staged copies (bf16 shards to the host, bf16 masters back). On the CPU the host is
    also the device, so this checks the plumbing and the arithmetic: the same losses as colossalai's ZeRO-1 step with
    the state on the device (--no-lean_zero), bit for bit, and a resume from its checkpoint that continues like the
    uninterrupted run. The GPU measurement: benchmark/RESULTS.md."""
    args = ["--plugin", "ep", "--max_steps", "8", "--save_interval", "4", "--keep_last", "5"]
    full, part, ref = tmp_path / "full", tmp_path / "part", tmp_path / "ref"
    log = train(2, full, *args, "--offload_optimizer")
    # the lean step by default (its offloaded copies and the host's fused AdamW), not the AdamW kernel
    assert "optimizer step: lean ZeRO-1, optimizer state in host memory (AdamW on 1 CPU thread)" in log, \
        log[-3000:]
    assert zero_step_record(full, 8) == (True, False)
    train(2, ref, *args, "--no-lean_zero")
    assert [r["loss"] for r in metrics(full)] == [r["loss"] for r in metrics(ref)]
    interrupted_copy(full, part, 4)
    check_resumed(full, part, train(2, part, *args, "--offload_optimizer", "--resume"), 4, 8)


def test_bad_inputs_give_one_line_errors(tmp_path):
    res = colossalai_run(2, "--plugin", "ep_zero", "--extra_dp_size", "3", "--output_path", str(tmp_path / "a"))
    assert "error: world size (2) must be divisible by extra_dp_size (3)" in res.stderr, res.stderr[-3000:]
    assert "127.0.0.1: failure" in res.stdout + res.stderr
    res = colossalai_run(2, "--prompt_field", "question", "--output_path", str(tmp_path / "b"))
    assert "error: " in res.stderr and "question" in res.stderr and "found" in res.stderr, res.stderr[-3000:]
