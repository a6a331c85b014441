"""Does an export work where only torch + transformers + safetensors are installed (no openmoe, no colossalai)?

Builds a tiny export (model + tokenizer) with openmoe, computes what our code gives, then runs PROBE in a clean
interpreter (`python -I`, openmoe and colossalai blocked) that loads the export through transformers' Auto classes
with trust_remote_code and reports logits, greedy ids, pipeline("text-generation") text, AutoTokenizer ids and
apply_chat_template ids. tests/unit/test_hf_export.py runs it with our pinned transformers (4.51); for another
transformers, point it at that interpreter (recorded in the issue-16 report for 5.x):

    python3 -m venv /tmp/venv5
    /tmp/venv5/bin/pip install torch==2.13.0 "transformers>=5,<6" safetensors sentencepiece
    .venv/bin/python tests/hf_export_check.py /tmp/venv5/bin/python
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

PROBE = r'''
import json, os, sys
sys.modules["openmoe"] = None  # importing it raises ImportError
sys.modules["colossalai"] = None
sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "openmoe"))]
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

export, spec = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(export)
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
batch = tok(spec["prompts"], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
greedy = model.generate(**batch, max_new_tokens=spec["new"], do_sample=False, suppress_tokens=spec["suppress"])
pipe = pipeline("text-generation", model=model, tokenizer=tok)
text = pipe(spec["prompts"][0], max_new_tokens=spec["new"], do_sample=False, suppress_tokens=spec["suppress"],
            return_full_text=False)[0]["generated_text"]
chat = tok.apply_chat_template(spec["messages"], tokenize=True)
print(json.dumps({
    "transformers": transformers.__version__, "model_module": type(model).__module__,
    "openmoe_importable": "openmoe" in sys.modules and sys.modules["openmoe"] is not None,
    "input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"].tolist(),
    "logits": logits.tolist(), "greedy": greedy.tolist(), "pipeline_text": text.strip(),
    "probe_ids": tok(spec["probe"])["input_ids"],
    "chat_ids": chat["input_ids"] if hasattr(chat, "keys") else chat,  # transformers 5 returns a BatchEncoding
}))
'''

PROMPTS = ["Reverse the word: apple. Output:", "Hi"]
PROBE_TEXT = "naïve café 東京 🙂 Hello  world\n\nInput: x"  # mixed scripts, an emoji (byte fallback), double space
TURNS = [("user", "Hi!"), ("assistant", "Hello."), ("user", "Name a colour.")]
NEW_TOKENS = 6


def build_export(directory: str) -> dict:
    """Tiny model + tokenizer exported to `directory`; returns what our code computes for PROBE's inputs."""
    import torch

    from openmoe import OpenMoeForCausalLM, preset
    from openmoe.data import decode, encode, load_tokenizer
    from openmoe.generation import generate
    from openmoe.hub import SHIPPED_TOKENIZER
    from openmoe.inference import chat_prompt, encode_batch
    from openmoe.tokenizer import save_tokenizer

    torch.manual_seed(0)
    model = OpenMoeForCausalLM(preset("tiny")).eval()
    tok = load_tokenizer(SHIPPED_TOKENIZER)
    model.save_pretrained(directory)
    save_tokenizer(tok, directory)
    ids, mask = encode_batch(tok, PROMPTS)  # what training/infer.py feed the model
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    greedy = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, vocab_limit=len(tok))
    alone, _ = encode_batch(tok, PROMPTS[:1])
    first = generate(model, alone, None, max_new_tokens=NEW_TOKENS, vocab_limit=len(tok))[0, alone.shape[1]:].tolist()
    first = first[: first.index(1)] if 1 in first else first
    return {
        "input_ids": ids.tolist(), "attention_mask": mask.tolist(), "logits": logits, "greedy": greedy.tolist(),
        "pipeline_text": decode(tok, first).strip(), "probe_ids": encode(tok, PROBE_TEXT),
        "chat_ids": encode(tok, chat_prompt(TURNS)),
        "spec": {"prompts": PROMPTS, "new": NEW_TOKENS, "suppress": list(range(len(tok), model.config.vocab_size)),
                 "probe": PROBE_TEXT, "messages": [{"role": r, "content": c} for r, c in TURNS]},
    }


def run_probe(python: str, directory: str, spec: dict, modules_cache: str) -> dict:
    env = dict(os.environ, HF_MODULES_CACHE=modules_cache, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    env.pop("PYTHONPATH", None)
    res = subprocess.run([python, "-I", "-c", PROBE, directory, json.dumps(spec)], capture_output=True, text=True,
                         env=env, cwd=modules_cache, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"probe failed under {python}:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout[res.stdout.index("{"):])


def compare(want: dict, got: dict) -> dict[str, str]:
    """Name -> "ok" or what differs."""
    import torch

    out = {}
    for key in ("input_ids", "attention_mask", "greedy", "pipeline_text", "probe_ids", "chat_ids"):
        out[key] = "ok" if want[key] == got[key] else f"ours {want[key]!r} vs export {got[key]!r}"
    diff = (torch.tensor(got["logits"]) - want["logits"]).abs().max().item()
    out["logits"] = "ok" if diff <= 1e-5 else f"max abs difference {diff}"
    out["openmoe_importable"] = "ok" if not got["openmoe_importable"] else "openmoe was importable in the probe"
    return out


def main(python: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        want = build_export(os.path.join(tmp, "export"))
        got = run_probe(python, os.path.join(tmp, "export"), want["spec"], tmp)
        result = compare(want, got)
    print(f"transformers {got['transformers']} ({python}), model class from {got['model_module']}")
    for key, verdict in result.items():
        print(f"  {key}: {verdict}")
    return 0 if all(v == "ok" for v in result.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else sys.executable))
