"""Settings for running the notebooks under nbval (pytest --nbval-lax).

The notebook kernels inherit this process's environment, so these defaults reach them:
quick mode (small budgets), strict exercise checks (a wrong solution fails the test), and a
non-interactive matplotlib backend. A value you set yourself wins.
"""

import os

os.environ.setdefault("DIFFUSION_COURSE_QUICK", "1")
os.environ.setdefault("DIFFUSION_COURSE_STRICT_CHECKS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
