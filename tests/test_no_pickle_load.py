"""Nothing executes on load: every torch.load passes weights_only=True, and pickle is read only
through exporters/sources/safe_pickle.py's restricted unpickler."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gptdeploy", "exporters", "runtimes")
PICKLE_READERS = {"load", "loads", "Unpickler"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield f.value.id, f.attr, node


def _sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def offences(tree: ast.AST, path: Path) -> list[str]:
    found = []
    for module, attr, call in _calls(tree):
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        if module == "torch" and attr == "load":
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                found.append(f"{where}: torch.load without weights_only=True")
        if module == "pickle" and attr in PICKLE_READERS and path.name != "safe_pickle.py":
            found.append(f"{where}: pickle.{attr} outside safe_pickle.py")
        if module in ("np", "numpy") and attr == "load" and any(
            k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
            for k in call.keywords
        ):
            found.append(f"{where}: numpy.load with allow_pickle")
    for node in ast.walk(tree):  # aliases would hide a call from the checks above
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "torch", "torch.serialization"):
            names = {a.name for a in node.names}
            if node.module == "pickle" and path.name != "safe_pickle.py" or "load" in names:
                found.append(f"{where}: from {node.module} import {', '.join(sorted(names))}")
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("pickle", "torch") and a.asname:
                    found.append(f"{where}: import {a.name} as {a.asname}")
    return found


def test_torch_load_only_with_weights_only_and_pickle_only_in_safe_pickle():
    problems = [p for path, tree in _sources() for p in offences(tree, path)]
    assert problems == []


def test_the_checker_catches_what_it_must():
    bad = ast.parse(
        "import torch, pickle\n"
        "torch.load(f)\n"
        "torch.load(f, weights_only=False)\n"
        "torch.load(f, map_location='cpu', weights_only=True)\n"
        "pickle.load(f)\n"
        "pickle.Unpickler(f).load()\n"
        "from torch import load\n"
        "import pickle as p\n"
        "np.load(f, allow_pickle=True)\n"
    )
    found = offences(bad, ROOT / "gptdeploy" / "x.py")
    assert sorted(found) == sorted([
        "gptdeploy/x.py:2: torch.load without weights_only=True",
        "gptdeploy/x.py:3: torch.load without weights_only=True",
        "gptdeploy/x.py:5: pickle.load outside safe_pickle.py",
        "gptdeploy/x.py:6: pickle.Unpickler outside safe_pickle.py",
        "gptdeploy/x.py:9: numpy.load with allow_pickle",
        "gptdeploy/x.py:7: from torch import load",
        "gptdeploy/x.py:8: import pickle as p",
    ])
    assert offences(ast.parse("import pickle\npickle.loads(b)\n"), ROOT / "exporters" / "sources" / "safe_pickle.py") == []


def test_torch_load_is_called_somewhere():
    """The check above is not vacuous: the loaders do call torch.load."""
    assert any(m == "torch" and a == "load" for _, tree in _sources() for m, a, _ in _calls(tree))
