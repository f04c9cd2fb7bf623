"""Command-line entry point of the storage node daemon (placeholder until the daemon lands)."""

import argparse

from storaged import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="storaged",
        description="Fincrypt storage node: store encrypted shares and get paid for them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
