"""Long runs: one Generator, many consecutive generations, no growth in resident memory.

The full figure (200 x 256) comes from `python samples/soak.py`; this is the shorter CI run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "samples" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_60_generations_of_128_tokens_grow_resident_memory_less_than_5_percent(tmp_path):
    """In a process of its own that imports no torch, so that the baseline is the runtime's own
    (~70 MiB, not the ~400 MiB of a pytest process with torch, which would hide a leak)."""
    bundle = _soak_module().tiny_bundle(tmp_path, n_positions=192)  # prompt + 128 tokens fit
    proc = subprocess.run(
        [sys.executable, str(ROOT / "samples" / "soak.py"), "--bundle", str(bundle), "-n", "60", "-l", "128",
         "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(report)
    assert report["generations"] == 60 and report["tokens"] > 60 * 64  # most runs go the full length
    assert report["rss_warm_kib"] < 200 * 1024  # no torch in the measured process
    assert report["growth_pct"] < 5.0, report
