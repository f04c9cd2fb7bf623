"""The account's tree snapshot in the network: an ordinary object, found through a signed, versioned pointer.

A snapshot (the caller makes it: e.g. a consistent SQLite backup copy) is uploaded like any file; its
:class:`~fincryptfs.objectstore.StoredObject` (id, key, roots) is sealed with AES-256-GCM under a key derived
from the master key and put in a :class:`~fincryptfs.core.messages.ManifestPointer` signed by the account key.
The mediator stores a pointer only if its version is the current one + 1, so two machines publishing at once
cannot both win. A new machine with the master key finds the pointer, checks its signature, unseals it and
fetches the snapshot: nothing else needs to be carried over.

Ordering: the new snapshot object is committed *before* the pointer names it, and the old one is deleted only
*after* the new pointer is stored, so at every moment the pointer names a readable snapshot.

Snapshots are compressed (zlib level 1, streamed) before they are encrypted: a tree's rows are names, JSON and
hex ids that compress 4-5× (a real tree of 80,881 entries: 17.5 MiB, 3.6 MiB compressed, in 0.07 s), and the
whole snapshot goes out again after every burst of changes, so this is most of what a large tree costs to keep
published. Level 1 compressed that 6.3× faster than level 6 for 7 % more bytes. A compressed snapshot starts
with SNAPSHOT_MAGIC; one without it (published before compression) is used as it is.

The mediator knows which object is the snapshot (the pointer names it) and sees it again at every publish, so
its size must not count the tree's entries: Padmé alone gave it to 2-4 % (1,000 files: 30,720 bytes; 1,050:
31,744), although the files themselves travel in packs. The compressed stream is therefore followed by zeros
up to a power-of-two bucket (``snapshot_bucket``, at least SNAPSHOT_MIN_BUCKET): the padded size then tells the
number of entries only to within a factor of two, for at most twice the bytes per publish (publishes are
spaced by their cost, ``uploadqueue.publish_spacing``). Padded sizes also hide how well the tree compresses.
Readers before this padding refuse a padded snapshot (trailing bytes) rather than misread it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .core.crypto import NONCE_BYTES, derive_key
from .core.errors import FincryptError, IntegrityError, RemoteProtocolError
from .core.ids import AccountId, ObjectId
from .core.messages import ManifestPointer
from .core.padding import TRAILER_BYTES
from .core.wire import canonical_json, decode_object
from .mediator_client import MediatorClient
from .objectstore import ObjectStore, StoredObject
from .rpc import PeerError

log = logging.getLogger(__name__)

POINTER_KEY_PURPOSE = "manifest-pointer-v1"
SNAPSHOT_MAGIC = b"FCSNAPZ1"  # a zlib stream of the SQLite snapshot follows
SNAPSHOT_LEVEL = 1
SNAPSHOT_MIN_BUCKET = 64 * 2**10  # a tree of up to ~1,300 entries: all look alike
_CHUNK = 2**20
_POINTER_AD_TAG = b"fincrypt-manifest-pointer-v1\x00"


class SnapshotRollbackError(IntegrityError):
    """The mediator's pointer is older than one this client already published: it lost or withheld state."""


class TreeDivergedError(FincryptError):
    """The account's pointer moved past the version this client last saw: another machine published its tree.
    Publishing over it would replace that tree (and delete its snapshot), so this client stops."""


def check_pointer_version(current: int, seen: int) -> None:
    """Publishing is allowed only on top of the pointer this client saw last (``seen``): the mediator's being
    older is a rollback, newer means another machine published meanwhile."""
    if current < seen:
        raise SnapshotRollbackError(
            f"the mediator's manifest pointer is at version {current}, but this client already saw version "
            f"{seen}: the mediator lost or is withholding newer state")
    if current > seen:
        raise TreeDivergedError(
            f"the account's tree was published from another machine (pointer version {current}; this machine's "
            f"last is {seen}). This machine stops publishing its tree so as not to replace that one; its own "
            "changes stay here. One machine should use an account at a time: to carry on here with the "
            "account's current tree, unmount, move meta.db out of the data folder and mount again")


def _ad(account_id: str, version: int, object_id: str) -> bytes:
    return _POINTER_AD_TAG + bytes.fromhex(account_id) + version.to_bytes(8, "big") + bytes.fromhex(object_id)


def seal_stored_object(master_key: bytes, account_id: str, version: int, stored: StoredObject) -> bytes:
    """nonce || AES-GCM(StoredObject JSON), bound to account, version and object id."""
    nonce = os.urandom(NONCE_BYTES)
    key = derive_key(master_key, POINTER_KEY_PURPOSE)
    return nonce + AESGCM(key).encrypt(nonce, canonical_json(stored.to_json()),
                                       _ad(account_id, version, stored.object_id))


def unseal_stored_object(master_key: bytes, pointer: ManifestPointer) -> StoredObject:
    key = derive_key(master_key, POINTER_KEY_PURPOSE)
    try:
        plain = AESGCM(key).decrypt(pointer.sealed[:NONCE_BYTES], pointer.sealed[NONCE_BYTES:],
                                    _ad(pointer.account_id, pointer.version, pointer.object_id))
    except (InvalidTag, ValueError) as exc:
        raise IntegrityError(f"manifest pointer version {pointer.version} does not open with this master key "
                             "(wrong key, or it was altered)") from exc
    try:
        stored = StoredObject.from_json(decode_object(plain))
    except RemoteProtocolError as exc:
        raise IntegrityError(f"manifest pointer version {pointer.version} holds a malformed object: {exc}") from exc
    if stored.object_id != pointer.object_id:
        raise IntegrityError("manifest pointer names one object but seals another")
    return stored


async def current_pointer(store: ObjectStore) -> ManifestPointer | None:
    """The account's pointer, with its signature checked against the account key; None if there is none."""
    return await account_pointer(store.mediator)


async def account_pointer(mediator: MediatorClient) -> ManifestPointer | None:
    """``current_pointer`` through a bare mediator client (``fincryptfs restore`` has no object store)."""
    envelope = await mediator.get_pointer()
    if envelope is None:
        return None
    pointer = ManifestPointer.open(envelope)
    if pointer.account_id != mediator.account_key.id:
        raise IntegrityError(f"the mediator returned a pointer of account {pointer.account_id[:16]}…, not ours")
    return pointer


async def publish_snapshot(store: ObjectStore, master_key: bytes, db_path: Path, version: int, *,
                           before_commit: Callable[[str], None] | None = None,
                           on_replaced: Callable[[str], None] | None = None) -> int:
    """Upload the snapshot file ``db_path`` and point the account at it; returns the new pointer version.

    ``version`` is the newest pointer version this client has seen (0 if none); the new pointer is stored
    as the next one, by compare-and-swap at the mediator. A pointer older than ``version`` is refused
    (SnapshotRollbackError), a newer one, or losing the compare-and-swap, means another machine published
    (TreeDivergedError): nothing is replaced.

    ``before_commit(object_id)`` is called before the snapshot object is committed; a caller that notes it
    settles a failed publish itself against the pointer (right even when the pointer update's answer was lost,
    where deleting the object here would leave the pointer naming a deleted snapshot). Without it, a failed
    publish deletes the object here, best effort. The snapshot the pointer named before is handed to
    ``on_replaced`` (to be deleted durably) or deleted here, best effort.
    """
    old = await current_pointer(store)  # checked before the upload too: a refused publish sends nothing
    check_pointer_version(old.version if old is not None else 0, version)
    packed = Path(db_path).with_name(Path(db_path).name + ".z")
    try:
        await trio.to_thread.run_sync(compress_snapshot, Path(db_path), packed)
        stored = await store.put_file(packed, before_commit=before_commit)
    finally:
        packed.unlink(missing_ok=True)
    account_id = AccountId(store.account_key.id)
    try:
        new_version = version + 1
        pointer = ManifestPointer(account_id, new_version, ObjectId(stored.object_id),
                                  seal_stored_object(master_key, account_id, new_version, stored), int(time.time()))
        try:
            await store.mediator.put_pointer(pointer.seal(store.account_key))
        except PeerError as exc:
            if exc.status == 409:  # the version was taken after our read: by another machine
                check_pointer_version(new_version, version)
            raise
        if old is not None and old.object_id != stored.object_id:
            if on_replaced is not None:
                on_replaced(old.object_id)
            else:
                await _delete_quietly(store, old.object_id)
        return new_version
    except BaseException:
        if before_commit is None:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await _delete_quietly(store, stored.object_id)  # nothing points at it
        raise


async def _delete_quietly(store: ObjectStore, object_id: str) -> None:
    try:
        await store.delete(object_id)
    except PeerError as exc:
        log.warning("could not delete old snapshot object %s: %s", object_id[:16], exc)


async def fetch_latest_snapshot(store: ObjectStore, master_key: bytes, dest: Path) -> int | None:
    """Fetch the snapshot the account's pointer names into ``dest``; its version, or None if no pointer yet."""
    pointer = await current_pointer(store)
    if pointer is None:
        return None
    stored = unseal_stored_object(master_key, pointer)
    fetched = Path(dest).with_name(Path(dest).name + ".fetched")
    try:
        await store.fetch_to_file(stored, fetched)
        await trio.to_thread.run_sync(decompress_snapshot, fetched, Path(dest))
    finally:
        fetched.unlink(missing_ok=True)
    return pointer.version


def snapshot_bucket(length: int) -> int:
    """The padded size of a snapshot object whose compressed stream has ``length`` bytes: the next power of two
    (trailer included), at least SNAPSHOT_MIN_BUCKET."""
    return max(SNAPSHOT_MIN_BUCKET, 1 << (length + TRAILER_BYTES - 1).bit_length())


def compress_snapshot(src: Path, dest: Path) -> None:
    """``dest`` = SNAPSHOT_MAGIC + zlib(``src``) + zeros, streamed (memory bounded whatever the tree's size): its
    padded size as an object is ``snapshot_bucket`` of the stream (a power of two is its own Padmé size)."""
    packer = zlib.compressobj(SNAPSHOT_LEVEL)
    with open(src, "rb") as inp, open(dest, "wb") as out:
        out.write(SNAPSHOT_MAGIC)
        while chunk := inp.read(_CHUNK):
            out.write(packer.compress(chunk))
        out.write(packer.flush())
        written = out.tell()
        zeros = snapshot_bucket(written) - TRAILER_BYTES - written
        while zeros > 0:
            out.write(bytes(min(zeros, _CHUNK)))
            zeros -= _CHUNK


def decompress_snapshot(src: Path, dest: Path) -> None:
    """The SQLite file in a fetched snapshot ``src`` (compressed or, if published before compression, as is)
    written to ``dest``; IntegrityError if the compressed stream is damaged or cut short, or followed by
    anything but the zeros that pad it."""
    with open(src, "rb") as inp, open(dest, "wb") as out:
        if inp.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
            inp.seek(0)
            shutil.copyfileobj(inp, out, _CHUNK)
            return
        unpacker = zlib.decompressobj()
        try:
            while not unpacker.eof and (chunk := inp.read(_CHUNK)):
                while chunk and not unpacker.eof:  # at most _CHUNK out per call: a highly compressed chunk
                    out.write(unpacker.decompress(chunk, _CHUNK))  # does not balloon memory
                    chunk = unpacker.unconsumed_tail
            out.write(unpacker.flush())
        except zlib.error as exc:
            raise IntegrityError(f"the tree snapshot does not decompress: {exc}") from exc
        if not unpacker.eof:
            raise IntegrityError("the tree snapshot is cut short")
        # then the padding, read a chunk at a time (it may be as long as the stream); unused_data is empty when
        # the stream ended where a read did, and the rest of the file must be checked all the same
        rest = unpacker.unused_data or inp.read(_CHUNK)
        while rest:
            if rest.count(0) != len(rest):
                raise IntegrityError("the tree snapshot has trailing bytes after its compressed stream")
            rest = inp.read(_CHUNK)
