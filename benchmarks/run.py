"""The benchmark runner as a script: ``python benchmarks/run.py <name> [...]`` is
``python -m benchmarks <name> [...]`` (same options; ``--help`` lists them), from any directory."""
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
    from benchmarks.__main__ import main

    sys.exit(main())
