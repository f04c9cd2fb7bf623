"""Command-line entry point of the mediator daemon (placeholder until the daemon lands)."""

import argparse

from mediatord import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mediatord",
        description="Fincrypt mediator: match clients with storage nodes, audit nodes, settle payments.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
