"""The dependency rule (docs/architecture.md), checked on the source: the run path — runtimes and
the Generator with what it needs — never imports the export side, torch or transformers; the
contract imports neither side; only the torch runtimes (loaded by name, lazily) may import torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MOUNTED = {"exporters": "gptdeploy.exporters", "runtimes": "gptdeploy.runtimes"}

# The contract: what both sides share. It imports neither side.
CONTRACT = {
    "gptdeploy.errors", "gptdeploy.config", "gptdeploy.contract", "gptdeploy.manifest",
    "gptdeploy.bundle", "gptdeploy.graph_refs", "gptdeploy.hashing", "gptdeploy.machine",
    "gptdeploy.engines", "gptdeploy.profiles", "gptdeploy.evidence",
}
# The run path: what an application embedding the Generator (or writing audit logs) loads.
RUN_PATH = {
    "gptdeploy.steps", "gptdeploy.sampling", "gptdeploy.textstate", "gptdeploy.tokenizer",
    "gptdeploy.options", "gptdeploy.results", "gptdeploy.generate", "gptdeploy.chat", "gptdeploy.conversation",
    "gptdeploy.engine", "gptdeploy.engine.ticket", "gptdeploy.engine.job", "gptdeploy.engine.layout",
    "gptdeploy.engine.loop",
}
TORCH_RUNTIMES = {"gptdeploy.runtimes.torch", "gptdeploy.runtimes.torch_cuda"}
HEAVY = ("torch", "transformers", "onnx", "optimum", "safetensors")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] in MOUNTED:
        parts[0:1] = MOUNTED[parts[0]].split(".")
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [p for top in ("gptdeploy", *MOUNTED) for p in (ROOT / top).rglob("*.py")]
    return {_module_name(p): p for p in files}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, node.lineno, id(node) in top)]
            out += [(f"{node.module}.{a.name}", node.lineno, id(node) in top) for a in node.names]
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = _modules()
# The server (gptdeploy/serve) runs bundles too: a serving machine installs no torch either.
RUNTIME_SIDE = RUN_PATH | {m for m in MODULES if any(_under(m, f"gptdeploy.{p}") for p in ("runtimes", "audit", "serve"))}


def test_the_layers_name_real_modules():
    assert CONTRACT | RUN_PATH <= set(MODULES), sorted((CONTRACT | RUN_PATH) - set(MODULES))
    assert TORCH_RUNTIMES <= set(MODULES)


@pytest.mark.parametrize("module", sorted(RUNTIME_SIDE))
def test_the_run_path_never_imports_the_export_side_or_torch(module):
    bad = []
    for name, line, _ in _imports(MODULES[module]):
        if _under(name, "gptdeploy.exporters") or _under(name, "gptdeploy.parity"):
            bad.append(f"line {line}: {name} (export side)")
        elif module not in TORCH_RUNTIMES and any(_under(name, h) for h in HEAVY):
            bad.append(f"line {line}: {name}")
        elif module in TORCH_RUNTIMES and _under(name, "gptdeploy.modeling"):
            continue  # the canonical module is the torch runtime's reason to exist
        elif _under(name, "gptdeploy.modeling") or _under(name, "gptdeploy.cli") or _under(name, "gptdeploy.bench"):
            bad.append(f"line {line}: {name}")
    assert not bad, f"{module} imports " + "; ".join(bad)


@pytest.mark.parametrize("module", sorted(CONTRACT))
def test_the_contract_imports_neither_side(module):
    bad = [f"line {line}: {name}" for name, line, _ in _imports(MODULES[module])
           if (_under(name, "gptdeploy") and name != "gptdeploy" and name not in CONTRACT and name.rpartition(".")[0] not in CONTRACT)
           or any(_under(name, h) for h in HEAVY)]
    assert not bad, f"{module} imports " + "; ".join(bad)


def test_torch_runtimes_are_reached_only_by_name():
    """Nothing imports the torch runtimes statically: the registry loads them by name when asked."""
    bad = [f"{m} line {line}" for m, path in MODULES.items() for name, line, _ in _imports(path)
           if any(_under(name, t) for t in TORCH_RUNTIMES) and m not in TORCH_RUNTIMES]
    assert not bad, bad


def test_a_violation_is_caught(tmp_path):
    """The walker sees imports at any depth, including inside functions."""
    f = tmp_path / "m.py"
    f.write_text("import numpy\n\ndef late():\n    from gptdeploy.exporters.export import export_bundle\n")
    found = _imports(f)
    assert ("gptdeploy.exporters.export", 4, False) in found and ("numpy", 1, True) in found
