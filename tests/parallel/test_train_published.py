"""train.py on published checkpoints with no manual steps (issue 16): a hub id resolved from the HF cache with the
hub offline, the published layout (.bin shards, old config spelling, upstream's custom tokenizer class), no
--tokenizer; then generation from the export, again without --tokenizer. A non-tiny preset without a tokenizer is
one line, before any model is built."""

import os
import subprocess
import sys

import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.hub import SHIPPED_TOKENIZER
from tests.helpers import ROOT, colossalai_run, metrics
from tests.published_layout import write_hub_cache, write_published_checkpoint

REPO = "OrionZheng/openmoe-tiny-fixture"
COMMON = ["--no-tensorboard", "--batch_size", "4", "--max_length", "48", "--warmup_steps", "1"]


def test_hub_id_trains_and_generates_without_tokenizer_flag(tmp_path):
    torch.manual_seed(5)
    model = OpenMoeForCausalLM(preset("tiny"))
    published = tmp_path / "openmoe-tiny"
    write_published_checkpoint(str(published), model, os.path.join(SHIPPED_TOKENIZER, "spiece.model"))
    hf_home = tmp_path / "hf"
    write_hub_cache(str(hf_home), REPO, str(published))
    offline = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    res = colossalai_run(2, "--pretrained", REPO, "--trainable", "experts", "--max_steps", "2", *COMMON,
                         "--output_path", str(out), env=offline)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "done: 2 steps" in log, log[-4000:]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    # the published weights were loaded: a frozen one comes back as it was (in the run's bf16)
    trained = OpenMoeForCausalLM.from_pretrained(str(out / "hf"))
    assert torch.equal(trained.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))

    res = subprocess.run([sys.executable, "infer.py", "--model", str(out / "hf"), "--prompt",
                          "Reverse the word: apple.", "--max_new_tokens", "4", "--no_stream"], cwd=ROOT,
                         capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, OMP_NUM_THREADS="1", **offline))
    assert res.returncode == 0 and res.stdout.startswith("=== 0:"), res.stderr[-3000:]


def test_non_tiny_preset_without_tokenizer_is_one_line(tmp_path):
    res = colossalai_run(2, "--model_name", "base", *COMMON, "--output_path", str(tmp_path / "x"))
    errors = [line for line in res.stderr.splitlines() if "error: " in line]
    assert errors and all("no tokenizer for preset 'base'" in e for e in errors), res.stderr[-3000:]
    assert "127.0.0.1: failure" in res.stdout + res.stderr
