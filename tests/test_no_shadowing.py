"""Nothing in this repository shadows an installed distribution when Python runs from its root.

`python -m pytest`, `python -m mpo_fast`, a notebook or a script in the checkout: the working
directory comes first on sys.path there, so a top-level package of ours named like an installed
one is imported in its place. It happened: the repo's kernels/ hid Hugging Face's `kernels`,
which transformers >= 5.25 imports, and both README commands failed. Each check runs in a fresh
interpreter started in the folder it checks.
"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every top-level name the folder offers to `import` (packages, namespace folders, modules)
# that an installed distribution also provides, and where `import name` goes from there.
_CLASHES = r"""
import importlib.metadata as md, importlib.util, json, os, sys
root = os.path.realpath(os.getcwd())
env = os.path.realpath(sys.prefix) + os.sep  # a venv may live in the checkout (.venv/)
assert os.path.realpath(sys.path[0] or os.getcwd()) == root, sys.path[0]
names = {e.name[:-3] if e.name.endswith(".py") else e.name for e in os.scandir(root)
         if (e.is_dir() and e.name.isidentifier()) or e.name.endswith(".py")}
owners = md.packages_distributions()
clashes = {}
for name in sorted(names & set(owners)):
    if "mpo-fast" in owners[name]:
        continue
    spec = importlib.util.find_spec(name)
    places = [spec.origin] if spec.origin else []
    places += list(spec.submodule_search_locations or [])
    inside = [p for p in places if os.path.realpath(p).startswith(root + os.sep)
              and not os.path.realpath(p).startswith(env)]
    if inside:
        clashes[name] = {"distributions": owners[name], "resolves_to": inside}
print(json.dumps(clashes))
"""


def _clashes(folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CLASHES], cwd=folder, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_no_top_level_name_of_the_repo_shadows_an_installed_distribution():
    clashes = _clashes(ROOT)
    assert not clashes, (
        f"imported from the repo root, these names resolve into the repository instead of the "
        f"installed distributions: {clashes}")


def test_the_check_catches_a_shadowing_package(tmp_path):
    """The check above can fail: a regular package named like an installed distribution."""
    victim = "yaml"  # PyYAML, a dependency of the trainer
    assert "PyYAML" in importlib.metadata.packages_distributions()[victim]
    (tmp_path / victim).mkdir()
    (tmp_path / victim / "__init__.py").write_text("")
    (tmp_path / "notes").mkdir()  # a folder no distribution provides: not a clash
    assert set(_clashes(tmp_path)) == {victim}


def test_transformers_and_our_kernels_import_from_the_repo_root():
    """What failed on transformers 5.25: its model classes import the `kernels` distribution."""
    pytest.importorskip("transformers")
    code = (
        "import os, importlib.util, importlib.metadata as md\n"
        "from transformers import AutoModelForCausalLM, LlamaForCausalLM\n"
        "import mpo_fast.kernels.logprob_forward as fwd\n"
        "import sys\n"
        "root = os.path.realpath(os.getcwd())\n"
        "env = os.path.realpath(sys.prefix) + os.sep\n"
        "assert os.path.realpath(fwd.__file__).startswith(root), fwd.__file__\n"
        "if 'kernels' in md.packages_distributions():\n"
        "    import kernels\n"
        "    where = os.path.realpath(kernels.__file__ or '')\n"
        "    assert where.startswith(env) or not where.startswith(root), kernels.__path__\n"
        "    print('kernels', md.version('kernels'), kernels.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if "kernels" in importlib.metadata.packages_distributions():
        assert out.stdout.startswith("kernels "), out.stdout
