"""Tests of .ci/check_html.py's display-math overflow check, on tiny pages in Chromium.

No MathJax is needed: the pages hold ``mjx-container[display="true"]`` elements of known
widths, as MathJax's CHTML output would, inside a column of known width.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>{title}</title></head>
<body><main><div style="width: 300px; padding: 0 10px">
<p>Some prose.</p>
<div class="equation-column">
<mjx-container display="true" style="display: block">
<mjx-math style="display: inline-block; width: {width}px; height: 20px"></mjx-math>
<mjx-assistive-mml style="display: none">{title} equation</mjx-assistive-mml>
</mjx-container>
</div></div></main></body></html>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_display_math_wider_than_its_column_fails_the_page(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text('<meta http-equiv="Refresh" content="0; '
                                         'url=narrow.html" />\n')
    (tmp_path / "narrow.html").write_text(PAGE.format(title="narrow", width=250))
    (tmp_path / "wide.html").write_text(PAGE.format(title="wide", width=650))
    run = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "check_html.py"), str(tmp_path),
         "--chromium", str(CHROMIUM)],
        capture_output=True, text=True, timeout=300,
    )
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    lines = out.splitlines()
    narrow = next(line for line in lines if "narrow.html:" in line and "redirect" not in line)
    assert narrow.startswith("ok"), out
    wide = next(line for line in lines if "wide.html:" in line)
    assert wide.startswith("FAIL"), out
    # the column is 300 px wide (padding excluded), the equation 650 px
    assert "display math wider than its column (650 px > 300 px)" in out, out
    assert "'wide equation'" in out, out
    assert "narrow equation" not in out, out
