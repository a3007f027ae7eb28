"""The audit report: one self-contained HTML page, rendered by headless Chromium without console
errors and showing the token labels; PNG heatmaps; the report CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptdeploy.audit import append_records
from gptdeploy.audit.report import write_report
from gptdeploy.audit.views import write_pngs
from gptdeploy.errors import AuditError
from tests.audit_records import synthetic_record
from tests.test_audit import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INJECTION = '</script><img src=x onerror="document.title=\'pwned\'">'


@pytest.fixture
def log(tmp_path) -> Path:
    """Three records: CJK labels, a prompt holding markup, one long record (no axis labels)."""
    path = tmp_path / "audit.log"
    long_labels = [f"t{i}" for i in range(120)]
    append_records(path, [
        synthetic_record(0),
        synthetic_record(1, prompt_text=INJECTION, prompt_labels=[INJECTION, "他", "\t"]),
        synthetic_record(2, n_layer=2, n_head=2, prompt_labels=long_labels, dtype="float16"),
    ])
    return path


def test_the_report_is_one_self_contained_page(log, tmp_path):
    out, report, n = write_report(log, tmp_path / "report.html")
    page = out.read_text(encoding="utf-8")
    assert n == 3 and report.ok
    assert '<meta charset="utf-8">' in page and "Noto Sans CJK SC" in page and "Microsoft YaHei" in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # nothing fetched from anywhere
    assert "default-src 'none'" in page  # and the page forbids itself any fetch
    assert INJECTION not in page  # markup in a prompt is escaped, in the HTML and in the inline JSON
    assert "&lt;/script&gt;&lt;img" in page and "\\u003c/script>\\u003cimg" in page
    assert "他喜欢" in page and "Integrity: <b>ok</b>" in page


def _render(html: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after scripts ran, and every console message Chromium logged."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", html.resolve().as_uri()]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return done.stdout, console


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_chromium_renders_the_report_without_console_errors_and_shows_the_labels(log, tmp_path):
    out, _, _ = write_report(log, tmp_path / "report.html")
    dom, console = _render(out, tmp_path)
    assert console == [], console
    assert 'data-ready="1"' in dom  # the page script ran to its end
    assert "<title>pwned" not in dom and "<img" not in dom  # the markup stayed text
    first = dom.split('data-record="0"', 1)[1].split('data-record="1"', 1)[0]
    # Heatmap axis labels and the token-by-token view, both built by the script.
    xlabels = re.findall(r"<div[^>]*>([^<]*)</div>", first.split('class="xlabels"', 1)[1].split("</div></div>", 1)[0] + "</div>")
    assert xlabels == ["他", "喜欢[1/2]", "喜欢[2/2]", " eats", "&lt;b&gt;x&lt;/b&gt;", "\\n", "吃", " apples", "。"]
    seq = first.split('class="seq"', 1)[1].split("</div>", 1)[0]
    for label in ("他", "喜欢[1/2]", "吃", " apples", "&lt;|endoftext|&gt;"):
        assert f">{label}</span>" in seq
    sources = first.split('class="sources"', 1)[1].split("</ol>", 1)[0]
    assert sources.count("<li>") == 6 and "@" in sources  # the first generated token's sources, at row 5
    assert first.count("<canvas") == 1 + 2 * 3  # the heatmap and one thumbnail per layer and head


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_chromium_renders_a_long_record_and_every_record_opened(log, tmp_path):
    """Records after the first are built when opened: open them all and render again."""
    out, _, _ = write_report(log, tmp_path / "report.html")
    opened = tmp_path / "opened.html"
    opened.write_text(out.read_text(encoding="utf-8").replace('<details class="record"', '<details open class="record"'),
                      encoding="utf-8")
    dom, console = _render(opened, tmp_path)
    assert console == [], console
    assert dom.count('class="interactive"><h3>') == 3
    assert "hover the heatmap for token labels" in dom  # 122 positions: too many for axis labels
    assert ">t119</span>" in dom


def test_the_report_of_a_damaged_log_says_so(log, tmp_path):
    from gptdeploy.audit.log import scan

    data = log.read_bytes()
    at = scan(log).frames[1].offset + 300  # inside record 1's header
    bad = tmp_path / "bad.log"
    bad.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    result = run_cli("report", bad, "-o", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert "integrity failed" in result.output and "2 records; integrity failed" in result.output
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Integrity: <b>failed</b>" in page and "record at position 1" in page


def test_png_heatmaps(log, tmp_path):
    pytest.importorskip("matplotlib")
    result = run_cli("report", log, "--png", tmp_path / "png", "--record", "0")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == ["record0_layer0.png", "record0_layer1.png", "record0_rollout.png"]
    from gptdeploy.audit import read_records

    (rec,) = read_records(log, [0])
    (one,) = write_pngs(rec, tmp_path / "one", layer=1, head=2)
    assert one.name == "record0_layer1_head2.png"
    for p in [*(tmp_path / "png").iterdir(), one]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_is_a_clear_error(log, tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from gptdeploy.audit import read_records; from gptdeploy.audit.views import write_pngs\n"
        "from gptdeploy.errors import AuditError\n"
        f"rec = next(read_records({str(log)!r}))\n"
        "try:\n    write_pngs(rec, 'x')\nexcept AuditError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "PNG heatmaps need matplotlib" in out.stdout and "gptdeploy[audit]" in out.stdout, out.stderr


def test_report_needs_an_output(log):
    result = run_cli("report", log)
    assert result.exit_code == 2 and "give -o REPORT.html, --png DIR, or both" in result.output


def test_report_of_a_missing_record_is_an_audit_error(log, tmp_path):
    with pytest.raises(AuditError, match="there is no record 9"):
        write_report(log, tmp_path / "r.html", [9])
