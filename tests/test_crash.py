"""Crash safety of `gptdeploy export`: SIGKILL at seeded random moments leaves either no bundle or
a complete one, and a following export succeeds.

Killing an audit append is tested in tests/test_audit.py::test_killing_an_append_leaves_every_earlier_record_verifiable.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptdeploy.bundle import Bundle
from gptdeploy.errors import BundleError
from tests.factories import make_hf_gpt2_dir

ROOT = Path(__file__).resolve().parent.parent
KILL_POINTS = 4
POLL_S = 0.02


def _export(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from gptdeploy.cli import main; main()", "export", str(src), "-o", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _partials(parent: Path, out: Path) -> list[Path]:
    return [p for p in parent.iterdir() if re.fullmatch(rf"\.{re.escape(out.name)}\..+\.partial", p.name)]


def _leftovers(parent: Path, out: Path, src: Path) -> list[Path]:
    """Everything an export left beside its output other than the output itself."""
    return [p for p in parent.iterdir() if p not in (out, src)]


@pytest.mark.slow
def test_sigkilled_exports_leave_no_bundle_or_a_complete_one(tmp_path):
    src = make_hf_gpt2_dir(tmp_path / "src", n_layer=1, n_head=2, n_embd=16, n_positions=32, seed=3)
    work = tmp_path / "work"
    work.mkdir()

    # An uninterrupted run: how long it takes and when the temporary directory exists.
    ref_out = tmp_path / "ref"
    started = time.monotonic()
    proc = _export(src, ref_out)
    first_partial = None
    while proc.poll() is None:
        if first_partial is None and _partials(tmp_path, ref_out):
            first_partial = time.monotonic() - started
        time.sleep(POLL_S)
    total = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.read().decode()
    Bundle.load(ref_out)
    assert first_partial is not None and not _partials(tmp_path, ref_out)

    # Kill points: one in each of KILL_POINTS equal slices from just before the temporary
    # directory appears to the end of the run (the import of torch before that writes nothing).
    rng = np.random.default_rng(8)
    lo = 0.8 * first_partial
    edges = np.linspace(lo, total, KILL_POINTS + 1)
    points = [float(rng.uniform(a, b)) for a, b in itertools.pairwise(edges)]
    out = work / "bundle"
    outcomes = []
    for at in points:
        proc = _export(src, out, "--force")
        time.sleep(at)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if out.exists():
            Bundle.load(out)  # complete, or it would not be there
            outcomes.append("complete")
        else:
            outcomes.append("absent")
        for p in _leftovers(work, out, src):
            # Only the hidden temporary directory may be left; it is never at the output path.
            assert re.fullmatch(rf"\.{re.escape(out.name)}\.(.+\.partial|replaced-\d+)", p.name), p
            try:
                Bundle.load(p)
                outcomes[-1] += "+complete-partial"
            except BundleError:
                outcomes[-1] += "+partial"
    print(f"export {total:.1f} s (temporary dir at {first_partial:.1f} s); "
          f"killed at {', '.join(f'{t:.1f}' for t in points)} s: {outcomes}")

    # A following export succeeds beside whatever the killed ones left.
    proc = _export(src, out, "--force")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert Bundle.load(out).config == Bundle.load(ref_out).config
    assert _partials(tmp_path, out) == []  # the killed exports' temporary directories were removed
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the user's usual mode, not mkdtemp's 0700
