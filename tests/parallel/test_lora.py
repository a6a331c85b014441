"""LoRA under expert parallelism (2 ranks, plugin ep), through the trainer's own setup and loop
(tests/parallel/roundtrip_worker.py): only the adapters train; the PEFT adapter directory loads with
`PeftModel.from_pretrained` on one device and reproduces the parallel model; the merged export equals the adapter
model."""

import torch
from safetensors.torch import load_file

from openmoe import OpenMoeForCausalLM, preset
from tests.helpers import torchrun
from tests.parallel.roundtrip_worker import probe_batch
from tests.parallel.test_train_cli import COMMON


def test_lora_trains_adapters_only_and_exports_for_peft(tmp_path):
    from peft import PeftModel

    torchrun(2, "tests/parallel/roundtrip_worker.py", str(tmp_path), "--plugin", "ep", "--lora_rank", "4",
             "--merge_lora", "--max_steps", "5", *COMMON, "--lr", "2e-2")
    torch.manual_seed(42)  # the builder's init (--seed 42), in the run's bf16
    init = OpenMoeForCausalLM(preset("tiny")).to(torch.bfloat16).state_dict()
    frozen = torch.load(tmp_path / "frozen.pt")
    # every non-adapter weight (experts, router, embeddings, the adapted projections' own weights) is bitwise the init
    assert {k.replace(".base_layer.", ".") for k in frozen} == set(init)
    for key, value in frozen.items():
        assert torch.equal(value, init[key.replace(".base_layer.", ".")]), key
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 4 * 4 + 2 * 4 * 3  # tiny: 4 layers x (4 attention + 3 MLP projections) x (A, B)
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter)
    assert min(v.abs().max() for k, v in adapter.items() if "lora_B" in k) > 0  # B starts at 0: every B trained

    ids = probe_batch(preset("tiny").vocab_size)

    def base_model():
        model = OpenMoeForCausalLM(preset("tiny")).to(torch.bfloat16)
        model.load_state_dict(init)
        return model.eval()

    with torch.no_grad():
        untrained = base_model()(ids).logits.float()
    peft_model = PeftModel.from_pretrained(base_model(), str(tmp_path / "adapter")).eval()
    merged = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        via_peft, via_merged = peft_model(input_ids=ids).logits.float(), merged(ids).logits.float()
    parallel = torch.load(tmp_path / "logits.pt")
    trained_away = (via_peft - untrained).abs().max()
    assert (via_peft - parallel).abs().max() < 2e-2  # same bf16 weights; only the expert batching differs
    assert (via_merged - via_peft).abs().max() < 3e-2  # W + s B A rounded to bf16 once vs computed per step
    assert trained_away > 0.1, trained_away  # and the adapters changed the model


def test_lora_resume_restores_adapters_and_their_optimizer_state(tmp_path):
    """train.py through `colossalai run`: a LoRA run resumed from its step-3 checkpoint repeats steps 4-6 bitwise
    (adapters, their fp32 masters and Adam moments come back; the frozen weights have none)."""
    from tests.parallel.test_train_cli import check_resumed, interrupted_copy, train

    args = ["--plugin", "ep", "--lora_rank", "4", "--merge_lora", "--max_steps", "6", "--save_interval", "3",
            "--keep_last", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert "done: 6 steps" in train(2, full, *args)
    assert (full / "adapters" / "step-00000003" / "adapter_config.json").is_file()
    interrupted_copy(full, part, 3)
    check_resumed(full, part, train(2, part, *args, "--resume"), 3, 6)
