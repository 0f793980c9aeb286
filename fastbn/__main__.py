"""Command line: ``python -m fastbn info``."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn",
                                     description="fastbn: batch normalization for array code")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, build configuration and every backend")
    args = parser.parse_args(argv)
    if args.command == "info":
        import fastbn
        fastbn.show_config()
    return 0


if __name__ == "__main__":
    sys.exit(main())
