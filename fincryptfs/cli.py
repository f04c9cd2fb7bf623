"""Command-line entry point of the Fincrypt client (placeholder until the client lands)."""

import argparse

from fincryptfs import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fincryptfs",
        description="Fincrypt client: mount an encrypted, erasure-coded backup filesystem.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
