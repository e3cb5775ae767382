"""Input shards that are not local files: fsspec URLs (`s3://`, `gs://`, `https://`) and `pipe:` commands.

Why a type of its own: the stages identify an input shard by its content
(sha256), which for a local file is cheap to reuse (its size and mtime vouch for
it) but for a remote one would mean reading terabytes once more at every
fingerprint. A remote shard is identified instead by what its store's listing
says of it, its size and version (S3's and GCS's ETag, an HTTP ETag or
Last-Modified), which change whenever the object is rewritten. A `pipe:` shard
has no listing: it is identified by its command (moda cannot see behind it).

`ShardURL` is a `str`, so code that names, sorts, joins or serialises shards
treats it like a path string; `name` is its last component, as `Path.name`.
Pure: no I/O (the listing and the reading are `shardio.remote_shards`).
"""

from __future__ import annotations

import hashlib

from pipelines.core.layout import SHARD_SUFFIXES


def is_remote(spec: object) -> bool:
    """Whether a shard spec names data behind a URL or a command, not a local file."""
    text = str(spec)
    return "://" in text or text.startswith("pipe:")


class ShardURL(str):
    """A remote shard's URL, with the size and version its store's listing gave (or a `pipe:` command)."""

    size: int | None
    version: str

    def __new__(cls, url: str, size: int | None = None, version: str = "") -> ShardURL:
        self = super().__new__(cls, url)
        self.size, self.version = size, version
        return self

    def __reduce__(self):  # spawned workers and Dask get the listing's facts with the URL
        return (ShardURL, (str(self), self.size, self.version))

    @property
    def name(self) -> str:
        """The file name: a URL's last component; a command's last word that names a tar
        (`pipe:aws s3 cp s3://b/00007.tar -` is `00007.tar`), else its last word."""
        words = self.split() if self.startswith("pipe:") else [self]
        word = next((w for w in reversed(words) if w.endswith(SHARD_SUFFIXES)), words[-1])
        return word.rstrip("/").rsplit("/", 1)[-1]

    @property
    def identity(self) -> str:
        """What stands for the shard's sha256 in manifests: its size and version, or (with no
        version to go by) its URL and size."""
        facts = f"{self.size}:{self.version}" if self.version else f"{self}:{self.size}"
        return "remote:" + hashlib.sha256(facts.encode()).hexdigest()

    @property
    def stat(self) -> list:
        """[size, version]: the remote counterpart of a local file's [size, mtime_ns]."""
        return [self.size, self.version]
