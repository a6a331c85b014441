"""The package's import rules (STYLE.md), checked on the whole import graph, including imports inside functions:

  model layer (config, router, moe, losses, model, generation, kernels, finetune): torch and our config, never
      colossalai, torch.distributed, openmoe.parallel, openmoe.backend or openmoe.train
  openmoe.parallel: never colossalai, openmoe.backend or openmoe.train
  openmoe.io: never colossalai, openmoe.backend or openmoe.train
  only openmoe.backend imports colossalai; nothing in openmoe outside openmoe.train imports openmoe.train
"""

import ast
import os
import subprocess
import sys

from tests.helpers import ROOT

MODEL_LAYER = {"config", "router", "moe", "losses", "model", "generation", "kernels", "finetune"}


def imports_of(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), filename=path)
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    return names


def module_name(package_root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(package_root))
    return rel[:-3].replace(os.sep, ".").removesuffix(".__init__")


def forbidden_for(module: str) -> tuple[str, ...]:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in MODEL_LAYER:
        return "colossalai", "torch.distributed", "openmoe.parallel", "openmoe.backend", "openmoe.train"
    if parts[:2] in (["openmoe", "parallel"], ["openmoe", "io"]):
        return "colossalai", "openmoe.backend", "openmoe.train"
    if parts[:2] == ["openmoe", "backend"]:
        return ("openmoe.train",)
    if parts[:2] == ["openmoe", "train"]:
        return ()
    return "colossalai", "openmoe.train"


def violations(package_root: str) -> list[str]:
    """'module imports name' for every import that breaks a rule, over every .py file under package_root."""
    found = []
    for dirpath, _, files in os.walk(package_root):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            module = module_name(package_root, path)
            bad = forbidden_for(module)
            found += [f"{module} imports {name}" for name in sorted(imports_of(path))
                      if any(name == b or name.startswith(b + ".") for b in bad)]
    return sorted(found)


def test_package_keeps_its_import_rules():
    assert violations(os.path.join(ROOT, "openmoe")) == []


def test_a_model_file_importing_colossalai_is_caught(tmp_path):
    """The checker itself: a model-layer file with a colossalai import inside a function, a parallel module importing
    the backend, and an io module importing train are each reported; a backend module importing colossalai is not."""
    pkg = tmp_path / "openmoe"
    for sub in ("", "parallel", "io", "backend"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "model.py").write_text("import torch\n\ndef f():\n    from colossalai.booster import Booster\n")
    (pkg / "parallel" / "x.py").write_text("from openmoe.backend.colossal import boost\n")
    (pkg / "io" / "y.py").write_text("import openmoe.train.builder\n")
    (pkg / "backend" / "colossal.py").write_text("import colossalai\n")
    assert violations(str(pkg)) == ["openmoe.io.y imports openmoe.train.builder",
                                    "openmoe.model imports colossalai.booster",
                                    "openmoe.parallel.x imports openmoe.backend.colossal"]


def test_model_layer_imports_with_colossalai_and_distributed_blocked():
    """Beyond the static graph: importing the model layer and io succeeds with colossalai made unimportable."""
    mods = sorted(MODEL_LAYER) + ["io.hf", "io.resumable", "parallel.sizes"]
    code = ("import sys; sys.modules['colossalai'] = None\n" + "".join(f"import openmoe.{m}\n" for m in mods)
            + "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr[-3000:]
