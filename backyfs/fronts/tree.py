"""The namespace of the FUSE mount, built from the list of valid versions (no I/O here).

    /<volume>/<uid>/disk.img      the version's device
    /<volume>/<uid>/info.json     its metadata and partition table
    /<volume>/<uid>/part1 ...     each partition: a window (offset, length) of the same device
    /<volume>/latest              symlink to the newest valid version's directory
    /<volume>/<YYYY-MM-DDTHH-MM-SS>   symlink per version, by creation time (local time, as `ls` shows
                                  it; a second version in the same second gets a _2 suffix)

Inode numbers are handed out per path key and never reused during a mount, so a kernel that still
holds an inode of a removed version gets that version's (unchanged) attributes, not another file's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from backyfs.export.partitions import Partition
from backyfs.metadata.db import Version

ROOT_INODE = 1
ROOT, VOLUME, VDIR, IMAGE, INFO, PART, LINK = "root", "volume", "vdir", "image", "info", "part", "link"
DIRS = (ROOT, VOLUME, VDIR)


@dataclass
class Node:
    inode: int
    kind: str
    uid: str | None = None  # the version of a vdir, image, info or part
    offset: int = 0  # image and part: the window on the device
    length: int = 0
    data: bytes = b""  # info: the file's content; link: the target
    mtime_ns: int = 0
    children: dict[str, int] = field(default_factory=dict)


def time_alias(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(created))


class Tree:
    def __init__(self) -> None:
        now = time.time_ns()
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, ROOT, mtime_ns=now)}
        self.parents: dict[int, int] = {ROOT_INODE: ROOT_INODE}
        self._ids: dict[tuple, int] = {}
        self.versions: dict[str, Version] = {}
        self.partitions: dict[str, list[Partition]] = {}

    @property
    def root(self) -> Node:
        return self.nodes[ROOT_INODE]

    def _add(self, parent: Node, name: str, key: tuple, kind: str, **attrs) -> Node:
        inode = self._ids.get(key)
        if inode is None:
            inode = self._ids[key] = len(self._ids) + ROOT_INODE + 1
        node = self.nodes[inode] = Node(inode, kind, **attrs)
        self.parents[inode] = parent.inode
        parent.children[name] = inode
        return node

    def update(self, versions: list[Version]) -> set[str]:
        """Rebuild the tree for these valid versions; return the uids that are gone."""
        gone = set(self.versions) - {v.uid for v in versions}
        self.versions = {v.uid: v for v in versions}
        for uid in gone:
            self.partitions.pop(uid, None)
        self.root.children = {}
        by_volume: dict[str, list[Version]] = {}
        for v in sorted(versions, key=lambda v: (v.created, v.uid)):
            by_volume.setdefault(v.volume, []).append(v)
        for volume, vs in sorted(by_volume.items()):
            vol = self._add(self.root, volume, ("volume", volume), VOLUME,
                            mtime_ns=int(vs[-1].created * 1e9))
            for v in vs:
                self._add_version(vol, v)
            self._add_links(vol, vs)
        return gone

    def _add_version(self, vol: Node, v: Version) -> None:
        mtime = int(v.created * 1e9)
        vdir = self._add(vol, v.uid, ("vdir", v.uid), VDIR, uid=v.uid, mtime_ns=mtime)
        self._add(vdir, "disk.img", ("image", v.uid), IMAGE, uid=v.uid, length=v.size, mtime_ns=mtime)
        self._fill_vdir(vdir)

    def _fill_vdir(self, vdir: Node) -> None:
        uid = vdir.uid
        assert uid is not None
        v, parts = self.versions[uid], self.partitions.get(uid, [])
        info = {**v.to_json(), "partitions": [p.to_json() for p in parts]}
        data = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()
        self._add(vdir, "info.json", ("info", uid), INFO, uid=uid, data=data, length=len(data),
                  mtime_ns=vdir.mtime_ns)
        for name in [n for n in vdir.children if n.startswith("part")]:
            del vdir.children[name]
        for p in parts:
            self._add(vdir, f"part{p.number}", ("part", uid, p.number, p.offset, p.length), PART,
                      uid=uid, offset=p.offset, length=p.length, mtime_ns=vdir.mtime_ns)

    def _add_links(self, vol: Node, versions: list[Version]) -> None:
        seen: dict[str, int] = {}
        for v in versions:
            alias = time_alias(v.created)
            seen[alias] = seen.get(alias, 0) + 1
            if seen[alias] > 1:
                alias = f"{alias}_{seen[alias]}"
            self._link(vol, alias, v)
        self._link(vol, "latest", versions[-1])

    def _link(self, vol: Node, name: str, v: Version) -> None:
        self._add(vol, name, ("link", vol.inode, name, v.uid), LINK, data=v.uid.encode(),
                  length=len(v.uid), mtime_ns=int(v.created * 1e9))

    def set_partitions(self, uid: str, parts: list[Partition]) -> None:
        """Show a version's partitions (found by the caller, which reads the device)."""
        self.partitions[uid] = parts
        inode = self._ids.get(("vdir", uid))
        if uid in self.versions and inode is not None:
            self._fill_vdir(self.nodes[inode])

    def child(self, parent: Node, name: str) -> Node | None:
        if name == ".":
            return parent
        if name == "..":
            return self.nodes[self.parents[parent.inode]]
        inode = parent.children.get(name)
        return None if inode is None else self.nodes[inode]
