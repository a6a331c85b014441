"""PEFT on our model (issue 16): LoRA on the attention and dense-MLP projections trains (only the adapters move),
the adapter saves and reloads onto a fresh base to the same logits; transformers' gradient-checkpointing switch maps
onto ModelOptions."""

import torch

from openmoe import OpenMoeForCausalLM, preset

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base():
    torch.manual_seed(0)
    return OpenMoeForCausalLM(preset("tiny", num_hidden_layers=2))


def test_lora_trains_a_step_and_the_adapter_reloads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    assert any("experts" in k for k in frozen) and any("gate_proj.lora_A" in k for k in trainable)

    ids = torch.randint(3, 700, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    moved = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, trainable[k])]
    assert len(moved) == len(trainable)  # every adapter matrix got a gradient and moved
    assert all(torch.equal(v, frozen[k]) for k, v in model.named_parameters() if not v.requires_grad)

    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert not torch.allclose(want, base().eval()(ids).logits)  # the adapter changes the function
    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-6)


def test_gradient_checkpointing_switch_maps_onto_model_options():
    model = base()
    model.gradient_checkpointing_enable()
    assert model.options.activation_checkpointing and model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.options.activation_checkpointing
