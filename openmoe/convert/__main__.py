"""python -m openmoe.convert {t5x,upcycle,moefy,mixtral} --help

Each converter module exposes `add_parser(subparsers)` that registers its subcommand with a `func(args)` default.
"""

import argparse
import importlib
import sys

CONVERTERS = ["t5x", "upcycle", "moefy", "mixtral"]  # module names under openmoe.convert


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openmoe.convert", description="OpenMoE checkpoint converters")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in CONVERTERS:
        importlib.import_module(f"openmoe.convert.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
