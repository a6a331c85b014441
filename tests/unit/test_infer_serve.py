"""`infer.py --serve` starts the OpenAI-compatible server (openmoe/serve) with infer.py's model options; the real
`openai` client gets the same greedy completion as `infer.py` prints for that prompt."""

import subprocess
import sys

import openai

from tests.helpers import ROOT


def test_infer_serve_answers_like_infer_prints():
    prompt = "Reverse the word: apple."
    printed = subprocess.run([sys.executable, "infer.py", "--model", "tiny", "--dropless", "--prompt", prompt,
                              "--max_new_tokens", "6", "--no_stream"], cwd=ROOT, capture_output=True, text=True,
                             timeout=240)
    assert printed.returncode == 0, printed.stderr[-3000:]
    expected = printed.stdout.split("=== 0:", 1)[1].strip()
    proc = subprocess.Popen([sys.executable, "infer.py", "--model", "tiny", "--tokenizer", "tests/assets/tokenizer",
                             "--serve", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny on http://127.0.0.1:"), (line, proc.stderr.read() if not line else "")
        client = openai.OpenAI(base_url=line.split(" on ")[1].split()[0], api_key="none", max_retries=0)
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
        assert got.strip() == expected
    finally:
        proc.terminate()
        proc.wait(timeout=30)
