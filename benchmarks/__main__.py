"""python -m benchmarks <name> [--device cpu|cuda] [--quick] [--out DIR]

Each benchmark lives in benchmarks/bench_<name>.py and defines
    add_arguments(parser)  (optional)  and  run(ctx: harness.Context) -> harness.Report
"""
import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from . import harness


def available():
    here = Path(__file__).parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv=None):
    names = available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=names + ["all"], help="which benchmark")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and iterations (smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    args, rest = parser.parse_known_args(argv)
    todo = names if args.name == "all" else [args.name]
    for name in todo:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        sub = argparse.ArgumentParser(prog=f"python -m benchmarks {name}")
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(sub)
        sub_args = sub.parse_args(rest if args.name != "all" else [])
        ctx = harness.Context(name=name, device=args.device, quick=args.quick, out_dir=Path(args.out),
                              plot=not args.no_plot, args=sub_args)
        report = mod.run(ctx)
        report.emit(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
