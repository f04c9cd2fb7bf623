"""The account's tree snapshot in the network: an ordinary object, found through a signed, versioned pointer.

A snapshot (the caller makes it: e.g. a consistent SQLite backup copy) is uploaded like any file; its
:class:`~fincryptfs.objectstore.StoredObject` (id, key, roots) is sealed with AES-256-GCM under a key derived
from the master key and put in a :class:`~fincryptfs.core.messages.ManifestPointer` signed by the account key.
The mediator stores a pointer only if its version is the current one + 1, so two machines publishing at once
cannot both win. A new machine with the master key finds the pointer, checks its signature, unseals it and
fetches the snapshot: nothing else needs to be carried over.

Ordering: the new snapshot object is committed *before* the pointer names it, and the old one is deleted only
*after* the new pointer is stored, so at every moment the pointer names a readable snapshot.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .core.crypto import NONCE_BYTES, derive_key
from .core.errors import FincryptError, IntegrityError, RemoteProtocolError
from .core.ids import AccountId, ObjectId
from .core.messages import ManifestPointer
from .core.wire import canonical_json, decode_object
from .objectstore import ObjectStore, StoredObject
from .rpc import PeerError

log = logging.getLogger(__name__)

POINTER_KEY_PURPOSE = "manifest-pointer-v1"
_POINTER_AD_TAG = b"fincrypt-manifest-pointer-v1\x00"
PUBLISH_ATTEMPTS = 5


class SnapshotRollbackError(IntegrityError):
    """The mediator's pointer is older than one this client already published: it lost or withheld state."""


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
    envelope = await store.mediator.get_pointer()
    if envelope is None:
        return None
    pointer = ManifestPointer.open(envelope)
    if pointer.account_id != store.account_key.id:
        raise IntegrityError(f"the mediator returned a pointer of account {pointer.account_id[:16]}…, not ours")
    return pointer


async def publish_snapshot(store: ObjectStore, master_key: bytes, db_path: Path, version: int, *,
                           before_commit: Callable[[str], None] | None = None,
                           on_replaced: Callable[[str], None] | None = None) -> int:
    """Upload the snapshot file ``db_path`` and point the account at it; returns the new pointer version.

    ``version`` is the newest pointer version this client has seen (0 if none); a mediator offering an older
    one is refused (SnapshotRollbackError). Concurrent publishers are ordered by the mediator's
    compare-and-swap: on a conflict this re-reads the pointer and tries the next version.

    ``before_commit(object_id)`` is called before the snapshot object is committed; a caller that notes it
    settles a failed publish itself against the pointer (right even when the pointer update's answer was lost,
    where deleting the object here would leave the pointer naming a deleted snapshot). Without it, a failed
    publish deletes the object here, best effort. The snapshot the pointer named before is handed to
    ``on_replaced`` (to be deleted durably) or deleted here, best effort.
    """
    stored = await store.put_file(Path(db_path), before_commit=before_commit)
    account_id = AccountId(store.account_key.id)
    try:
        for _attempt in range(PUBLISH_ATTEMPTS):
            old = await current_pointer(store)
            current = old.version if old is not None else 0
            if current < version:
                raise SnapshotRollbackError(
                    f"the mediator's manifest pointer is at version {current}, but this client already saw "
                    f"version {version}: the mediator lost or is withholding newer state")
            new_version = current + 1
            pointer = ManifestPointer(account_id, new_version, ObjectId(stored.object_id),
                                      seal_stored_object(master_key, account_id, new_version, stored),
                                      int(time.time()))
            try:
                await store.mediator.put_pointer(pointer.seal(store.account_key))
            except PeerError as exc:
                if exc.status == 409:
                    log.info("pointer version %d was taken by another publisher; retrying", new_version)
                    continue
                raise
            if old is not None and old.object_id != stored.object_id:
                if on_replaced is not None:
                    on_replaced(old.object_id)
                else:
                    await _delete_quietly(store, old.object_id)
            return new_version
        raise FincryptError(f"could not publish the snapshot: the pointer changed under us {PUBLISH_ATTEMPTS} "
                            "times in a row; try again")
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
    await store.fetch_to_file(stored, Path(dest))
    return pointer.version
