"""Storage node throughput: PUT and GET MB/s over loopback against a real ``storaged`` process, next to a bare
hypercorn endpoint (same fincryptfs.asgi stack, body discarded / zeros returned) as the ceiling, with the CPU
milliseconds per MB the server process and the client (this process) spent in each phase; plus the CPU
time of proving 10,000 shares and the daemon's peak RSS. Prints a JSON object on its last line.

Usage: python bench/storaged_throughput.py [--shares 64] [--share-mib 4] [--concurrency 8] [--prove 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from fincryptfs import rpc
from fincryptfs.asgi import App, Request, Response, Router, json_response, serve_app
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import NodeId, new_share_id
from fincryptfs.core.merkle import MerkleTree
from fincryptfs.core.messages import Challenge, ProofResponse, UploadGrant
from fincryptfs.core.wire import decode_object

REPO = Path(__file__).resolve().parents[1]


# --- the bare endpoint (run in its own process with --bare-server) -------------------------------------------

async def bare_server() -> None:
    router = Router()

    async def sink(request: Request) -> Response:
        async for _ in request.stream(1 << 40):
            pass
        return json_response({"ok": True}, 201)

    async def zeros(request: Request) -> Response:
        size = int(request.query()["size"])

        async def chunks():  # type: ignore[no-untyped-def]
            block = bytes(1 << 20)
            for start in range(0, size, 1 << 20):
                yield block[:min(1 << 20, size - start)]
        return Response(200, b"", {"content-type": "application/octet-stream"}, chunks())

    router.add("PUT", "/v1/shares/{share_id}", sink)
    router.add("GET", "/v1/shares/{share_id}", zeros)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, App(router), "127.0.0.1", 0)
        print(f"bare listening on {url}", flush=True)


# --- helpers ---------------------------------------------------------------------------------------------------

class Mediator:
    def __init__(self) -> None:
        self.key = SigningKey.generate()
        self.node_ids: list[str] = []

    def app(self) -> App:
        router = Router()

        async def announce(request: Request) -> Response:
            body = decode_object(await request.body(1 << 20))
            self.node_ids.append(body["node_id"])
            return json_response({"accepted": True, "mediator_id": self.key.id,
                                  "public_key": self.key.public.to_text(), "next_announce_in": 300})
        router.add("POST", "/v1/nodes/announce", announce)
        return App(router)


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)


async def wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes]) -> str:
    with trio.fail_after(30):
        while True:
            found = re.search(pattern, log.read_text(errors="replace"))
            if found:
                return found.group(1)
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            await trio.sleep(0.05)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (the 14th and 15th fields of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    return time.process_time()


def peak_rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


async def run_parallel(jobs: list, concurrency: int) -> float:  # type: ignore[type-arg]
    """Run the zero-argument async callables, ``concurrency`` at a time; returns wall seconds."""
    limit = trio.Semaphore(concurrency)

    async def one(job) -> None:  # type: ignore[no-untyped-def]
        async with limit:
            await job()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)
    return time.perf_counter() - started


# --- proving ---------------------------------------------------------------------------------------------------

def bench_prover(count: int, share_size: int, workdir: Path) -> dict[str, float]:
    """CPU seconds of answering one challenge for ``count`` shares (sparse zero shares of realistic depth)."""
    from fincryptfs.core.settings import ShareDir
    from storaged.prover import ProvableShare, answer_challenge
    from storaged.store import ShareStore

    store = ShareStore((ShareDir(workdir / "prove", 1 << 50),), 0, {})
    folder = store.folders[0]
    tree = MerkleTree.from_data(bytes(share_size))
    tree_bytes = tree.to_bytes()
    held = []
    for _ in range(count):
        share_id = new_share_id()
        paths = folder.paths(share_id)
        paths.data.parent.mkdir(exist_ok=True)
        with open(paths.data, "wb") as f:
            f.truncate(share_size)
        paths.tree.write_bytes(tree_bytes)
        held.append(ProvableShare(share_id, share_size, paths))
    key = SigningKey.generate()
    mediator = SigningKey.generate()
    challenge = Challenge(NodeId(mediator.id), NodeId(key.id), 1, os.urandom(32), 1,
                          tuple(s.share_id for s in held))
    answer_challenge(challenge, held[:200], NodeId(key.id), key)  # warm up imports and caches
    cpu0, wall0 = time.process_time(), time.perf_counter()
    answer = answer_challenge(challenge, held, NodeId(key.id), key)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    decoded = ProofResponse.decode(answer, key.public, max_bytes=1 << 30)
    from fincryptfs.core.challenge import verify_share_proof
    for proof in decoded.proofs[:100]:
        verify_share_proof(challenge.nonce, proof.share_id, tree.root, share_size, 1, proof)
    assert len(decoded.proofs) == count
    return {"prove_shares": count, "prove_cpu_s": round(cpu, 3), "prove_wall_s": round(wall, 3),
            "proof_response_mib": round(len(answer) / 2**20, 1)}


# --- main ------------------------------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict[str, object]:
    size = int(args.share_mib * 2**20)
    workdir = Path(tempfile.mkdtemp(prefix="storaged-bench-"))
    mediator = Mediator()
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, object] = {"shares": args.shares, "share_bytes": size, "concurrency": args.concurrency,
                                 "total_mib": args.shares * size / 2**20}
    try:
        async with trio.open_nursery() as nursery:
            mediator_url = await nursery.start(serve_app, mediator.app(), "127.0.0.1", 0)
            env_file = workdir / "node.env"
            env_file.write_text(f"STORAGED_LISTEN=127.0.0.1:0\nSTORAGED_DATA_DIR={workdir / 'node'}\n"
                                f"STORAGED_SHARE_DIRS={workdir / 'shares'}:1T\nSTORAGED_RESERVE_BYTES=0\n"
                                f"STORAGED_MEDIATORS={mediator_url}\n")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGED_", "FINCRYPT_"))}
            node = start([sys.executable, "-m", "storaged.cli", "--log-level", "WARNING", "--env-file",
                          str(env_file)], workdir / "node.log", env)
            procs.append(node)
            bare = start([sys.executable, str(Path(__file__).resolve()), "--bare-server"], workdir / "bare.log")
            procs.append(bare)
            node_url = await wait_for(workdir / "node.log", r"storaged listening on (\S+)", node)
            bare_url = await wait_for(workdir / "bare.log", r"bare listening on (\S+)", bare)
            with trio.fail_after(10):
                while not mediator.node_ids:
                    await trio.sleep(0.02)
            node_id = mediator.node_ids[-1]
            account = SigningKey.generate()
            base = os.urandom(size)
            shares = []
            for i in range(args.shares):
                data = i.to_bytes(8, "big") + base[8:]
                grant = UploadGrant(NodeId(mediator.key.id), NodeId(node_id), account.id, new_share_id(),  # type: ignore[arg-type]
                                    size, MerkleTree.from_data(data).root, int(time.time()) + 3600,
                                    os.urandom(16).hex())
                shares.append((grant, data))

            async with rpc.new_client(httpx.Timeout(120.0, connect=10.0)) as client:
                def put_job(url: str, grant: UploadGrant, data: bytes):  # type: ignore[no-untyped-def]
                    async def job() -> None:
                        r = await client.put(f"{url}/v1/shares/{grant.share_id}", content=data,
                                             headers={"fincrypt-grant": grant.seal(mediator.key).to_header()})
                        assert r.status_code == 201, r.text
                    return job

                def get_job(url: str, grant: UploadGrant, signed: bool):  # type: ignore[no-untyped-def]
                    async def job() -> None:
                        target = f"{url}/v1/shares/{grant.share_id}" + ("" if signed else f"?size={size}")
                        headers = rpc.signed_headers(account, "GET", target, b"") if signed else {}
                        received = 0
                        async with client.stream("GET", target, headers=headers) as r:
                            assert r.status_code == 200
                            async for chunk in r.aiter_raw():
                                received += len(chunk)
                        assert received == size
                    return job

                total_mb = args.shares * size / 1e6

                async def phase(name: str, server: subprocess.Popen[bytes], jobs: list) -> None:  # type: ignore[type-arg]
                    """MB/s, and CPU milliseconds per MB of the server process and of this (client) process."""
                    server0, client0 = cpu_s(server.pid), self_cpu_s()
                    t = await run_parallel(jobs, args.concurrency)
                    result[f"{name}_mb_s"] = round(total_mb / t, 1)
                    result[f"{name}_server_cpu_ms_per_mb"] = round((cpu_s(server.pid) - server0) * 1e3 / total_mb, 2)
                    result[f"{name}_client_cpu_ms_per_mb"] = round((self_cpu_s() - client0) * 1e3 / total_mb, 2)

                await phase("bare_put", bare, [put_job(bare_url, g, d) for g, d in shares])
                await phase("put", node, [put_job(node_url, g, d) for g, d in shares])
                await phase("bare_get", bare, [get_job(bare_url, g, False) for g, _ in shares])
                await phase("get", node, [get_job(node_url, g, True) for g, _ in shares])
                result["put_vs_bare"] = round(float(result["put_mb_s"]) / float(result["bare_put_mb_s"]), 2)  # type: ignore[arg-type]
                result["get_vs_bare"] = round(float(result["get_mb_s"]) / float(result["bare_get_mb_s"]), 2)  # type: ignore[arg-type]
                result["node_peak_rss_mib"] = round(peak_rss_mib(node.pid), 1)
            nursery.cancel_scope.cancel()
        del shares, base
        result.update(await trio.to_thread.run_sync(bench_prover, args.prove, 1 << 20, workdir))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shares", type=int, default=64)
    parser.add_argument("--share-mib", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prove", type=int, default=10_000)
    args = parser.parse_args()
    if args.bare_server:
        trio.run(bare_server)
        return
    result = trio.run(run, args)
    for name, value in result.items():
        print(f"{name:>22}: {value}")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
