"""The command lines of ColossalAI's OpenMoE example (its README's flag list and its train.sh) run unchanged on the
tiny model, except for the model name, the step budget and the output directory; `torchrun --standalone` and
`colossalai run --standalone` become `colossalai run`, which has no --standalone.

  train.sh:  --model_name "base" --plugin "hybrid" --pp_size 2 --dp_size 1 --ep_size 2 --use_kernel --zero_stage 1
             --batch_size 4                                                  (4 processes)
  README:    -d DATASET --task_name ... --num_epoch(s) N -i SAVE_INTERVAL --comm_overlap (a switch upstream)
"""

import pytest

from openmoe.train.config import COMM_OVERLAP_CHUNKS, parse_args
from tests.helpers import colossalai_run, metrics

TINY = ["--model_name", "tiny", "--max_length", "48", "--no-tensorboard"]


def test_upstream_flags_parse_with_upstream_meaning():
    run = parse_args(["--comm_overlap", "-i", "7", "-d", "data/sample/train.jsonl", "--num_epoch", "2",
                      "--dp_size", "1"])
    assert run.parallel.comm_overlap == COMM_OVERLAP_CHUNKS  # upstream's store_true switch: on, default chunks
    assert (run.checkpoint.save_interval, run.data.dataset, run.optim.num_epochs) == (7, "data/sample/train.jsonl", 2)
    assert parse_args(["--comm_overlap", "2"]).parallel.comm_overlap == 2
    assert parse_args(["--num_epochs", "5"]).optim.num_epochs == 5


def test_dp_size_is_checked_against_the_layout():
    from openmoe.config import preset
    from openmoe.parallel.sizes import resolve_sizes

    run = parse_args(["--plugin", "hybrid", "--pp_size", "2", "--ep_size", "2", "--dp_size", "1"])
    assert resolve_sizes(run, preset("tiny"), 4).moe_dp == 1
    with pytest.raises(ValueError, match=r"--dp_size 2 contradicts the layout: 4 ranks / \(pp_size 2 \* ep_size 2\) "
                                         r"gives 1 replicas of each expert; accepted: --dp_size 1 or none"):
        resolve_sizes(run.replace(dp_size=2), preset("tiny"), 4)


def test_upstream_train_sh_hybrid_and_readme_flags_train(tmp_path):
    hybrid = tmp_path / "hybrid"
    res = colossalai_run(4, "--plugin", "hybrid", "--pp_size", "2", "--dp_size", "1", "--ep_size", "2",
                         "--use_kernel", "--zero_stage", "1", "--batch_size", "4", *TINY, "--max_steps", "2",
                         "--output_path", str(hybrid), timeout=420)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "127.0.0.1: success" in log, log[-4000:]
    assert "plugin hybrid: world 4, ep 2, pp 2, moe_dp 1" in log and "done: 2 steps" in log
    readme = tmp_path / "readme"
    res = colossalai_run(2, "--plugin", "ep", "-d", "data/sample/train.jsonl", "--num_epoch", "1", "-i", "2",
                         "--comm_overlap", "--batch_size", "4", *TINY, "--max_steps", "3",
                         "--output_path", str(readme), timeout=420)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "127.0.0.1: success" in log, log[-4000:]
    assert sorted(p.name for p in (readme / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert [r["step"] for r in metrics(readme)] == [1, 2, 3]
