"""Peers that are slow, silent or hostile: the client gives up on them in bounded time and says why.

Real daemons throughout; the misbehaving peer is a real node behind a ``Gate`` that holds or trickles its
answers, or a small fake mediator on a raw trio socket. The client's deadlines are shortened for the test
(``monkeypatch``), so a hang shows as ``fail_after`` firing, not as minutes of waiting.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from clientdata_support import open_store
from netfixtures import start_network
from test_network import make_file, stored_indices

from fincryptfs import cli, downloader, mediator_client, uploader
from fincryptfs.core.crypto import new_master_key
from fincryptfs.core.settings import ClientSettings
from fincryptfs.keystore import save_key_file
from fincryptfs.objectstore import ReadError, UploadError
from fincryptfs.rpc import PeerError


async def test_a_node_trickling_its_put_answer_is_given_up_on(tmp_path: Path, nursery: trio.Nursery,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that takes the whole share, then sends its answer one byte every 0.2 s never trips a per-read
    timeout: the answer has a deadline of its own, the share goes to another node and the upload commits."""
    monkeypatch.setattr(uploader, "PUT_ANSWER_TIMEOUT", 1.0)
    net = await start_network(tmp_path, nursery, nodes=7, gated=True)
    bad = min(range(7), key=lambda i: net.nodes[i].node_id)  # placement takes nodes in id order: it gets a share
    net.gates[bad].trickle = 0.2
    async with open_store(net.mediator_url, tmp_path, segment_size=16384) as store:
        data = make_file(tmp_path / "src", 100_000, 1)
        with trio.fail_after(15):
            obj = await store.put_file(tmp_path / "src")
        assert await stored_indices(store, obj) == set(range(6))
        info = await store.mediator.object_info(obj.object_id)
        assert net.nodes[bad].node_id not in {s.node_id for s in info.shares if s.state == "stored"}
        net.gates[bad].trickle = None
        assert await store.read_range(obj, 0, len(data)) == data


async def test_a_read_from_trickling_nodes_ends_in_a_read_error(tmp_path: Path, nursery: trio.Nursery,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With only two healthy holders of a k = 3 object and four that trickle their answers, a read must fail
    (EIO at the mount) in bounded time, naming the slow nodes, instead of waiting for ever; with three healthy
    ones it is served by them."""
    monkeypatch.setattr(downloader, "GET_GRACE", 1.0)
    net = await start_network(tmp_path, nursery, nodes=6, gated=True)
    async with open_store(net.mediator_url, tmp_path, segment_size=16384, hedge_after=0.3) as store:
        data = make_file(tmp_path / "src", 100_000, 2)
        obj = await store.put_file(tmp_path / "src")
        for gate in net.gates[:3]:
            gate.trickle = 0.2
        with trio.fail_after(15):
            assert await store.read_range(obj, 0, len(data)) == data
        net.gates[3].trickle = 0.2
        with trio.fail_after(15), pytest.raises(ReadError) as caught:
            await store.read_range(obj, 0, len(data))
        assert "only 2 of the 3 shares" in str(caught.value)
        assert "did not send" in str(caught.value)
        for gate in net.gates:
            gate.trickle = None


class FakeMediator:
    """A mediator on a raw socket that reads each request whole and then misbehaves as ``mode`` says."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sent = 0  # answer bytes sent, all connections together
        self.requests: list[bytes] = []  # request lines

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += await stream.receive_some(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                self.requests.append(head.split(b"\r\n")[0])
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += await stream.receive_some(65536)
                await self._answer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _answer(self, stream: trio.SocketStream) -> None:
        if self.mode == "silent":
            await trio.sleep_forever()
        if self.mode == "trickle":
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n")
            while True:
                await stream.send_all(b" ")
                self.sent += 1
                await trio.sleep(0.2)
        if self.mode == "flood":
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                  b"content-length: 1099511627776\r\n\r\n")
            while self.sent < 64 * 2**20:
                await stream.send_all(b" " * 65536)
                self.sent += 65536
            await trio.sleep_forever()
        raise AssertionError(self.mode)


@pytest.mark.parametrize("mode", ["silent", "trickle", "flood"])
async def test_a_mediator_that_stalls_trickles_or_floods_is_given_up_on(tmp_path: Path, nursery: trio.Nursery,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        mode: str) -> None:
    """Every call to a mediator is bounded in time and in the bytes it buffers, however the mediator paces its
    answer; the failure says which mediator and what it did."""
    monkeypatch.setattr(mediator_client, "ANSWER_DEADLINE", 1.0)
    monkeypatch.setattr(mediator_client, "MAX_ANSWER", 2**20)
    fake = FakeMediator(mode)
    url = await nursery.start(fake.serve)
    expected = "longer than 1048576 bytes" if mode == "flood" else "did not answer GET /v1/account within 1 s"
    async with open_store(url, tmp_path) as store:
        with trio.fail_after(10):
            with pytest.raises(PeerError, match=expected):
                await store.account()
            src = tmp_path / "src"
            src.write_bytes(b"x" * 10_000)
            with pytest.raises(UploadError, match="could not place object"):
                await store.put_file(src)
    assert fake.sent < 8 * 2**20


@pytest.mark.parametrize("odd_url", ["http://1.2.3.999:1", "http://127.0.0.1:99999", "http://[::1"])
async def test_a_share_located_at_an_unusable_url_is_a_clear_read_error(tmp_path: Path, nursery: trio.Nursery,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        odd_url: str) -> None:
    """The mediator promises node URLs that parse (protocol.md); one that does not is its malformed answer,
    said so, not an httpx error escaping the read path (at the mount: an EIO with a traceback)."""
    net = await start_network(tmp_path, nursery, nodes=6)
    async with open_store(net.mediator_url, tmp_path, segment_size=16384) as store:
        data = make_file(tmp_path / "src", 50_000, 3)
        obj = await store.put_file(tmp_path / "src")
        real_json = store.mediator._json

        async def odd_answer(method: str, path: str, body: object = None) -> dict[str, object]:
            answer = await real_json(method, path, body)
            if path.startswith("/v1/objects/"):
                answer["shares"][0]["node_url"] = odd_url  # type: ignore[index]
            return answer

        monkeypatch.setattr(store.mediator, "_json", odd_answer)
        with pytest.raises(ReadError, match="malformed object info: node_url .*(valid|must be)"):
            await store.read_range(obj, 0, len(data))
        monkeypatch.undo()
        assert await store.read_range(obj, 0, len(data)) == data


async def test_status_says_when_the_mediator_did_not_answer(tmp_path: Path, nursery: trio.Nursery,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``fincryptfs status`` against a mediator that sends a byte now and then: bounded, and it says so rather
    than print the mediator's URL as if all were well next to files without health."""
    monkeypatch.setattr(cli, "HEALTH_WAIT", 0.5)
    monkeypatch.setattr(mediator_client, "ANSWER_DEADLINE", 2.0)  # longer than status waits, as in use
    url = await nursery.start(FakeMediator("trickle").serve)
    settings = ClientSettings.from_env({"FINCRYPT_DATA_DIR": str(tmp_path / "data"), "FINCRYPT_MEDIATOR_URL": url},
                                       home=tmp_path)
    save_key_file(settings.key_file, new_master_key(), None)
    files: list[dict[str, object]] = [{"object_id": "ab" * 32}]
    with trio.fail_after(10):
        line = await cli._add_health(settings, files)
        account = await cli._account_state(settings)
    assert line.startswith(url) and "no answer within 0.5 s" in line
    assert account is not None and "did not answer GET /v1/account within 2 s" in str(account["error"])
