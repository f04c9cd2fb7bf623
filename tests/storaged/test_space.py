"""Space accounting of the share folders: folders on one filesystem share its free space and its reserve."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core.errors import PolicyError
from fincryptfs.core.settings import ShareDir
from storaged.store import FolderSpace, ShareStore, disk_bytes, folder_rooms, total_room


@st.composite
def _folders(draw: st.DrawFn) -> tuple[list[FolderSpace], int]:
    disk_free = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=3))
    folders = []
    for _ in range(draw(st.integers(1, 5))):
        device = draw(st.integers(0, len(disk_free) - 1))
        capacity = draw(st.integers(0, 10**6))
        folders.append(FolderSpace(device, capacity, draw(st.integers(0, capacity)), 0, disk_free[device]))
    return folders, draw(st.integers(0, 10**5))


def _take(folders: list[FolderSpace], index: int, size: int) -> None:
    f = folders[index]
    folders[index] = FolderSpace(f.device, f.capacity, f.used, f.reserved + size, f.disk_free)


@settings(max_examples=300, deadline=None)
@given(_folders(), st.lists(st.integers(1, 4 * 10**5), max_size=12))
def test_reservations_never_overcommit_a_filesystem_or_a_folder(case: tuple[list[FolderSpace], int],
                                                                 sizes: list[int]) -> None:
    """Uploads placed as ShareStore.reserve_space places them (the folder with the most room, if it fits)
    never hold more than a filesystem has above the reserve, nor more than a folder's capacity left."""
    folders, reserve = case
    for size in sizes:
        rooms = folder_rooms(folders, reserve)
        best = max(range(len(folders)), key=lambda i: rooms[i])
        if rooms[best] >= size:
            _take(folders, best, size)
    for device in {f.device for f in folders}:
        on_it = [f for f in folders if f.device == device]
        assert sum(f.reserved for f in on_it) <= max(0, on_it[0].disk_free - reserve)
    for f in folders:
        assert f.used + f.reserved <= f.capacity


@settings(max_examples=300, deadline=None)
@given(_folders())
def test_free_space_is_exactly_what_can_still_be_reserved(case: tuple[list[FolderSpace], int]) -> None:
    """The reported free space counts each filesystem once: filling every folder to its room takes exactly it,
    and leaves no room anywhere."""
    folders, reserve = case
    free = total_room(folders, reserve)
    taken = 0
    for index in range(len(folders)):
        room = folder_rooms(folders, reserve)[index]
        _take(folders, index, room)
        taken += room
    assert taken == free
    assert total_room(folders, reserve) == 0 and not any(folder_rooms(folders, reserve))


def test_two_folders_on_one_filesystem_share_its_room(tmp_path: Path) -> None:
    """Two uploads in flight into two folders of one disk cannot both hold the same free space."""
    stats = os.statvfs(tmp_path)
    room = 50 << 20  # what is left above the reserve (other writers on the disk move it by a little)
    reserve = stats.f_bavail * stats.f_frsize - room
    store = ShareStore((ShareDir(tmp_path / "a", 1 << 50), ShareDir(tmp_path / "b", 1 << 50)), reserve, {})
    assert 25 << 20 < store.free_bytes() < 75 << 20  # counted once, not once per folder
    size = 40 << 20
    first = store.reserve_space(size)
    with pytest.raises(PolicyError, match="no room") as refused:
        store.reserve_space(size)
    assert refused.value.status == 507
    assert store.free_bytes() < 25 << 20
    store.release_reservation(first, size, stored=False)
    assert store.reserve_space(size).reserved == disk_bytes(size)
