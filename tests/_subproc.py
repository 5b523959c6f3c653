"""Running the package in a subprocess the way a user would, against the SAME build this test run
imports: the checkout for an in-place build (`python -m pytest`), site-packages for an installed one
(`pytest` after `pip install .`). The child gets that directory on PYTHONPATH and runs from a neutral
working directory, so `python -m ...` never picks up an unbuilt source tree from the cwd."""
import os
import tempfile
from pathlib import Path

import mpt_kernels

PACKAGE_PARENT = str(Path(mpt_kernels.__file__).resolve().parent.parent)
NEUTRAL_CWD = tempfile.gettempdir()


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
