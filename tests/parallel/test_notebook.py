"""notebooks/openmoe_quickstart.ipynb runs top to bottom, headless (nbclient), in a temporary working copy.

The kernel is registered here as its own kernelspec pointing at this interpreter (the venv's), so a "python3" kernel
installed elsewhere on the machine is never picked up. The working copy holds the repository's files (tracked and
untracked, not ignored) and links `.venv` to ours, so the notebook's install cell takes its "venv exists" branch.
Takes about 1.5-2.5 minutes on a 2-core CPU (most of it the 10-step `colossalai run`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "notebooks", "openmoe_quickstart.ipynb")
KERNEL = "openmoe-test-venv"


def _working_copy(dest: str) -> str:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):  # deleted-but-tracked files are listed too
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    venv = os.path.dirname(os.path.dirname(sys.executable))
    os.symlink(venv, os.path.join(dest, ".venv"))
    return dest


def _kernel_manager(kernel_dir: str) -> KernelManager:
    spec_dir = os.path.join(kernel_dir, KERNEL)
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "Python 3 (openmoe venv)", "language": "python"}, f)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))


def _texts(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            out.append(o["text"])
        elif "data" in o and "text/plain" in o["data"]:
            out.append(o["data"]["text/plain"])
    return "".join(out)


def test_quickstart_notebook_runs_headless(tmp_path):
    repo = _working_copy(str(tmp_path / "repo"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"  # what Colab and a plain Jupyter pick
    client = NotebookClient(nb, km=_kernel_manager(str(tmp_path / "kernels")), timeout=300,
                            resources={"metadata": {"path": repo}})
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    assert all(c.execution_count for c in code)
    text = "\n".join(_texts(c) for c in code)
    assert "exists: skipping scripts/install.sh" in text
    generated = [line for line in text.splitlines() if line.startswith("generated (")]
    assert len(generated) == 2 and all(not line.startswith("generated (0 tokens)") for line in generated), text
    assert "chat reply (" in text
    assert "done: 10 steps" in text and "127.0.0.1: success" in text
    answers = [line for line in text.splitlines() if line.startswith("=== ")]  # infer.py on the fine-tuned model
    assert len(answers) == 2 and all(len(line) > len("=== 0: ") for line in answers), answers
    assert "logits identical after T5X -> HF conversion: True" in text
    pngs = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 1
    assert os.path.isfile(os.path.join(repo, "outputs", "notebook", "run", "metrics.png"))
    assert os.path.isfile(os.path.join(repo, "outputs", "notebook", "from-t5x", "model.safetensors.index.json"))
