"""pytest runs everything in smoke mode unless told otherwise.

``BNN_COURSE_SMOKE`` is set before any test or notebook kernel starts, so nbmake's kernels
inherit it. ``setdefault`` lets a maintainer execute the book in full mode with
``BNN_COURSE_SMOKE=0 python -m pytest --nbmake --overwrite book/``.
"""

import os

os.environ.setdefault("BNN_COURSE_SMOKE", "1")
# No MPLBACKEND here: notebook kernels inherit the environment, and under Agg they would
# produce no figure outputs. Kernels pick the inline backend themselves; tests that plot
# choose Agg locally.
