"""The ``slsdeep`` command line (also ``python -m slsdeep``)."""

import argparse
import sys


def main(argv=None) -> int:
    import slsdeep_kernels

    parser = argparse.ArgumentParser(prog="slsdeep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="show what is installed (the training demo lands with the CLI issue)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print(f"slsdeep_kernels backends available here: {', '.join(slsdeep_kernels.available_backends())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
