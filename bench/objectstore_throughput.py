"""Durable upload and cold fetch of one large file through ObjectStore, against a real local network.

The mediator and six storage nodes run as separate processes (``fincryptfs devnet``), so the client's CPU time
(printed per phase, from getrusage) is separable from the daemons'. One random file of ``--mib`` MiB is
uploaded with ``put_file`` (returns only once every share is fsynced on its node and the object committed),
then fetched back with ``fetch_to_file`` and compared byte for byte.

    python bench/objectstore_throughput.py [--mib 256] [--profile out.prof] [--repeat 1]

``--profile`` writes cProfile stats of the client process (all phases). Client settings are the devnet's,
overlaid with the environment (``FINCRYPT_SEGMENT_SIZE=4194304 python bench/...`` compares segment sizes). The
last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import cProfile
import filecmp
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchkit import start_devnet  # noqa: E402

from fincryptfs import rpc  # noqa: E402
from fincryptfs.core.crypto import account_signing_key  # noqa: E402
from fincryptfs.core.settings import ClientSettings, read_env_file  # noqa: E402
from fincryptfs.keystore import load_master_key  # noqa: E402
from fincryptfs.objectstore import ObjectStore  # noqa: E402

MB = 1e6


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(settings: ClientSettings, master: bytes, src: Path, dest: Path, repeat: int,
              figures: dict[str, float]) -> None:
    size = src.stat().st_size
    async with rpc.new_client() as http:
        store = ObjectStore(mediator_url=settings.mediator_url or "", account_key=account_signing_key(master),
                            k=settings.k, n=settings.n, happy=settings.happy, segment_size=settings.segment_size,
                            spool_dir=settings.data_dir / "spool", http=http, cpu=trio.CapacityLimiter(2))
        for attempt in range(repeat):
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            stored = await store.put_file(src)
            up_s, up_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            await store.fetch_to_file(stored, dest)
            down_s, down_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            if not filecmp.cmp(src, dest, shallow=False):
                raise SystemExit("the fetched file differs from the source")
            dest.unlink()
            await store.delete(stored.object_id)
            print(f"run {attempt}: upload {size / MB / up_s:.1f} MB/s ({up_s:.2f} s, client CPU {up_cpu:.2f} s); "
                  f"fetch {size / MB / down_s:.1f} MB/s ({down_s:.2f} s, client CPU {down_cpu:.2f} s)",
                  file=sys.stderr)
            for key, value in (("upload_mb_s", size / MB / up_s), ("upload_client_cpu_s", up_cpu),
                               ("fetch_mb_s", size / MB / down_s), ("fetch_client_cpu_s", down_cpu)):
                figures[key] = max(figures.get(key, 0.0), value) if key.endswith("mb_s") else value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fincrypt-osbench-"))
    network = None
    try:
        src = work / "large.bin"
        with open(src, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(2**20))
        home = work / "net"
        home.mkdir()
        network = start_devnet(home)
        info = json.loads((home / "devnet.json").read_text())
        # the devnet's client settings, overlaid with the environment (e.g. FINCRYPT_SEGMENT_SIZE=4194304)
        settings = ClientSettings.from_env(read_env_file(Path(info["client_env"])), home=home)
        master = load_master_key(settings.key_file, settings.passphrase_file, interactive=False)
        figures: dict[str, float] = {}
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        trio.run(run, settings, master, src, work / "fetched.bin", args.repeat, figures)
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        print(json.dumps({"bench": "objectstore_throughput", "mib": args.mib, "k": settings.k, "n": settings.n,
                          "segment_size": settings.segment_size, **{k: round(v, 2) for k, v in figures.items()}}))
        return 0
    finally:
        if network is not None and network.poll() is None:
            os.kill(network.pid, signal.SIGINT)
            try:
                network.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(network.pid, signal.SIGKILL)
                network.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
