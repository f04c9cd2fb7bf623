"""A real storage node that lies in audits: storaged's own service, with its challenge answers swapped.

``--record F``: an honest node that also keeps its latest (node-signed) ProofResponse in F.
``--replay F``: answers every challenge with the ProofResponse recorded in F, whatever was asked: a node that
saves disk by replaying an old, validly signed answer. Everything else (uploads, reads, announces) is the real
storaged. Run as ``python tests/e2e/lying_node.py --env-file NODE.env --record F`` (or ``--replay F``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fincryptfs.core.wire import SignedRequest  # noqa: E402
from storaged.cli import load_settings  # noqa: E402
from storaged.daemon import open_service, run_service  # noqa: E402

log = logging.getLogger("lying_node")


async def run(env_file: Path, record: Path | None, replay: Path | None) -> None:
    settings = load_settings(env_file)
    async with open_service(settings) as service:
        honest = service.prove

        async def prove(body: bytes, signed: SignedRequest) -> bytes:
            if replay is not None:
                log.info("replaying the answer recorded in %s", replay)
                return replay.read_bytes()
            answer = await honest(body, signed)
            assert record is not None
            temp = record.with_suffix(".tmp")
            temp.write_bytes(answer)
            os.replace(temp, record)
            return answer

        service.prove = prove  # type: ignore[method-assign]
        await run_service(service)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env-file", type=Path, required=True)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path)
    mode.add_argument("--replay", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    trio.run(run, args.env_file, args.record, args.replay)


if __name__ == "__main__":
    main()
