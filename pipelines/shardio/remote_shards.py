"""Training shards behind fsspec URLs (`s3://`, `gs://`, `https://`, ...) or `pipe:` commands.

Listing: a spec is brace-expanded as webdataset does; globs are expanded by the
store, a folder lists its tars, and named shards are looked up in one listing of
each folder they sit in (41,000 LAION shards cost 41 S3 list requests, not
41,000 HEADs), so what is absent is known before any work and counted as a gap
(`data.missing_shards`). Each found shard carries its size and version
(`ShardURL`), which stand for its sha256 in the manifests.

Reading: a remote shard is streamed once, in 1 MiB blocks, into an unnamed
temporary file (under $TMPDIR; freed when its last reader closes) and then read
as a local one, mapped or with pread(): the readers group members by key
wherever they lie, which a forward-only stream cannot. A transfer that fails
part-way (a dropped connection, fewer bytes than the listing said) is started
again with backoff; a URL that does not exist or may not be read is an error
naming it. The split fetches the next shards on a thread while it splits one
(`fetch_ahead`), so transfer and work overlap. `pipe:<command>` runs the command (webdataset's convention,
e.g. `pipe:aws s3 cp s3://b/00007.tar -`) and reads its standard output; a
command that exits non-zero is retried, then an error with its stderr.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import braceexpand

from pipelines.core.layout import SHARD_SUFFIXES
from pipelines.core.shard_url import ShardURL, is_remote
from pipelines.shardio.remote import RemoteError, retry, version_of

BLOCK = 1 << 20
ASKS_IN_FLIGHT = 16
_HELD: dict[str, BinaryIO] = {}
_AHEAD: dict[str, Future] = {}
_FETCHER: ThreadPoolExecutor | None = None


def list_shards(spec: str) -> tuple[list[ShardURL], list[str]]:
    """(the shards a remote spec names that are there, the URLs of those that are not)."""
    if spec.startswith("pipe:"):  # a command has no listing: every one it names is taken as there
        return [ShardURL(cmd) for cmd in braceexpand.braceexpand(spec)], []
    from fsspec.core import strip_protocol, url_to_fs  # public, unlike a filesystem's _strip_protocol

    fs, _ = url_to_fs(spec)
    found: list[ShardURL | str] = []  # in the spec's order; a named shard's URL until it is looked up
    named: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        path = strip_protocol(pattern)
        if glob.has_magic(path.split("://", 1)[-1]):
            hits = retry("listing", pattern, lambda path=path: fs.glob(path, detail=True))
            found += [_shard(fs, info) for _, info in sorted(hits.items()) if _is_shard(info)]
        elif not path.endswith(SHARD_SUFFIXES) and _is_folder(fs, pattern, path):
            found += [_shard(fs, info) for info in sorted(_ls(fs, pattern, path), key=lambda i: i["name"])
                      if _is_shard(info)]
        else:
            named.append(pattern)
            found.append(pattern)
    looked_up = _look_up(fs, named)
    shards = [s if isinstance(s, ShardURL) else looked_up[s] for s in found]
    return [s for s in shards if s is not None], [url for url in named if looked_up[url] is None]


def look_up_shards(urls: list[str]) -> tuple[list[ShardURL], list[str]]:
    """(the shards at these URLs of one store that are there, with their listed size and version; the
    URLs of those that are not): what a run recorded, checked again without reading a byte of it."""
    if not urls:
        return [], []
    if urls[0].startswith("pipe:"):
        return [ShardURL(cmd) for cmd in urls], []
    from fsspec.core import url_to_fs

    looked_up = _look_up(url_to_fs(urls[0])[0], list(urls))
    return [s for s in looked_up.values() if s is not None], [url for url, s in looked_up.items() if s is None]


def _look_up(fs, urls: list[str]) -> dict[str, ShardURL | None]:
    """URL -> the shard there (None: absent), from one listing of each folder the URLs sit in."""
    from fsspec.core import strip_protocol

    listings: dict[str, dict[str, dict]] = {}
    infos: list[dict | None] = []
    for url in urls:
        parent = url.rstrip("/").rsplit("/", 1)[0]
        if parent not in listings:
            listings[parent] = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info
                                for info in _ls(fs, parent, strip_protocol(parent))}
        infos.append(listings[parent].get(url.rsplit("/", 1)[-1]))
    # What a listing left out or gave without a size (an HTTP folder page has only links) is
    # asked for one by one (HEAD), several at once.
    ask = [i for i, info in enumerate(infos) if info is None or info.get("size") is None]
    with ThreadPoolExecutor(ASKS_IN_FLIGHT) as pool:
        for i, info in zip(ask, pool.map(lambda i: _info(fs, urls[i]), ask)):
            infos[i] = info
    return {url: ShardURL(url, info.get("size"), version_of(info)) if info else None for url, info in zip(urls, infos)}


def _shard(fs, info: dict) -> ShardURL:
    return ShardURL(fs.unstrip_protocol(info["name"]), info.get("size"), version_of(info))


def _is_shard(info: dict) -> bool:
    name = info["name"].rstrip("/").rsplit("/", 1)[-1]
    return info.get("type", "file") == "file" and name.endswith(SHARD_SUFFIXES) and not name.startswith(".")


def _is_folder(fs, url: str, path: str) -> bool:
    return bool(retry("looking up", url, lambda: _absent_as(FileNotFoundError, False, fs.isdir, path)))


def _ls(fs, url: str, path: str) -> list[dict]:
    return retry("listing", url, lambda: _absent_as(FileNotFoundError, [], fs.ls, path, detail=True))


def _info(fs, url: str) -> dict | None:
    from fsspec.core import strip_protocol

    return retry("looking up", url, lambda: _absent_as(FileNotFoundError, None, fs.info, strip_protocol(url)))


def _absent_as(error: type[Exception], value, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except error:
        return value


def fetch(shard: str) -> BinaryIO:
    """The shard's bytes in an unnamed temporary file, positioned at its start."""
    out = tempfile.TemporaryFile(prefix="moda-shard-")
    expected = getattr(shard, "size", None)

    def once() -> None:
        out.seek(0)
        out.truncate()
        if shard.startswith("pipe:"):
            _run_pipe(shard[len("pipe:"):], out)
        else:
            import fsspec

            with fsspec.open(shard, "rb") as source:
                shutil.copyfileobj(source, out, BLOCK)
        if expected is not None and out.tell() != expected:
            raise OSError(f"got {out.tell()} bytes, the listing said {expected}: the transfer was cut short")

    try:
        retry("reading", shard, once)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def _run_pipe(command: str, out: BinaryIO) -> None:
    with tempfile.TemporaryFile() as err:
        code = subprocess.run(command, shell=True, stdout=out, stderr=err).returncode
        if code:
            err.seek(0)
            raise OSError(f"the command exited with status {code}: {err.read()[-2000:].decode(errors='replace')}")


def open_shard(path) -> BinaryIO:
    """A shard's bytes, local or remote, as an open binary file at its start: a local file opened,
    a remote one fetched (or the copy `held` keeps of it, shared)."""
    if not is_remote(path):
        return open(path, "rb")
    copy = _HELD.get(str(path))
    if copy is None:
        return fetch(path)
    shared = os.fdopen(os.dup(copy.fileno()), "rb")  # the same unnamed file (and file offset)
    shared.seek(0)
    return shared


def fetch_ahead(path) -> None:
    """Start fetching a remote shard on this process's fetch thread, for `held` to take: the split
    asks for the next shards while it splits one, so the transfer overlaps the work."""
    global _FETCHER
    if str(path) in _AHEAD or str(path) in _HELD:
        return
    if _FETCHER is None:
        _FETCHER = ThreadPoolExecutor(1, thread_name_prefix="moda-fetch")
    _AHEAD[str(path)] = _FETCHER.submit(fetch, path)


@contextlib.contextmanager
def held(path) -> Iterator[None]:
    """Within it, every read of a remote shard reads one fetched copy (the split indexes a shard
    twice when it is not a plain tar), the one `fetch_ahead` started if it did; a local shard is
    read where it lies."""
    if not is_remote(path) or str(path) in _HELD:
        yield
        return
    ahead = _AHEAD.pop(str(path), None)
    _HELD[str(path)] = ahead.result() if ahead is not None else fetch(path)
    try:
        yield
    finally:
        _HELD.pop(str(path)).close()


__all__ = ["RemoteError", "fetch", "fetch_ahead", "held", "list_shards", "look_up_shards", "open_shard"]
