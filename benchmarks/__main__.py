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
    parser.add_argument("name", choices=names + ["all"], help="which benchmark (`<name> --help`: its own options)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and iterations (smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="results folder (default benchmarks/results): <name>_<device>[_quick].json, .md, .png")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    known = [a for a in argv if a not in ("-h", "--help")] if wants_help else argv
    args, rest = (parser.parse_known_args(known) if not (wants_help and not [a for a in known if a in names])
                  else (parser.parse_args(argv), []))
    if wants_help:  # `<name> --help`: the common options, then the benchmark's own
        parser.print_help()
        mod = importlib.import_module(f"benchmarks.bench_{args.name}")
        sub = argparse.ArgumentParser(prog=f"python -m benchmarks {args.name}", add_help=False)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(sub)
            print(f"\noptions of {args.name}:")
            sub.print_help()
        return 0
    if args.name == "all" and rest:
        parser.error(f"unrecognized arguments for 'all' (benchmark options go with one benchmark): {' '.join(rest)}")
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
