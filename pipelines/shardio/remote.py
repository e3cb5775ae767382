"""Dataset folders behind fsspec URLs (s3://, gs://, https://, ...), mirrored into a local cache.

Why a mirror: evaluation sets (clip_benchmark's and DataComp's live on S3 and
the Hugging Face hub) are read in full by every model's pass and again by every
rerun; a local copy is fetched once, then read like any local folder
(clip_benchmark's own `--wds_cache_dir` does the same). A copy is current when
the remote listing (every file's path, size and ETag, or its modification time
where the store has no ETag) matches the one recorded with it; otherwise it is
fetched again into a temporary folder and swapped in whole, so a killed fetch
never leaves a half copy that looks complete.

Transient errors (a dropped connection, a throttled request) are retried with
backoff; a URL that does not exist or may not be read is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pipelines.core.manifest import atomic_write_json

T = TypeVar("T")
RETRIES = 4
LISTING = ".moda-listing.json"


def is_url(spec: str | Path) -> bool:
    return "://" in str(spec)


class RemoteError(ValueError):
    """A remote folder that cannot be read (the message names the URL and the fix)."""


def retry(what: str, url: str, call: Callable[[], T], retries: int | None = None) -> T:
    """`call()`, tried `retries` times (RETRIES by default) with backoff on a transient error; a
    missing or forbidden URL is an error at once."""
    retries = retries or RETRIES
    for attempt in range(retries):
        try:
            return call()
        except (FileNotFoundError, PermissionError) as err:
            raise RemoteError(f"{url}: {what} failed ({type(err).__name__}: {err}); check the URL and the "
                              "credentials (for S3: AWS_* variables or ~/.aws, AWS_ENDPOINT_URL for another store)"
                              ) from None
        except Exception as err:  # transient network errors come in many types (aiohttp, botocore, OSError)
            if attempt == retries - 1:
                raise RemoteError(f"{url}: {what} failed {retries} times ({type(err).__name__}: {err}); "
                                  "check the network and run again (finished work is kept)") from None
            time.sleep(min(8.0, 0.5 * 2 ** attempt))
    raise AssertionError("unreachable")


def listing(url: str) -> dict[str, list]:
    """{relative path: [size, ETag or mtime]} of every file under the folder `url` names."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()  # fsspec keeps listings per process: a long-lived one would miss a change
    found = retry("listing", url, lambda: fs.find(root, detail=True))
    if not found:
        raise RemoteError(f"{url}: no files there; check the URL (a folder of task folders, or one task)")
    root = root.rstrip("/")
    return {name[len(root):].lstrip("/"): [info.get("size"), version_of(info)]
            for name, info in sorted(found.items()) if info.get("type", "file") == "file"}


VERSION_FIELDS = ("ETag", "etag", "md5Hash", "Content-MD5", "Digest", "generation", "LastModified", "Last-Modified",
                  "last_modified", "updated", "mtime")
"""Where fsspec's stores put what changes when an object is rewritten (S3, GCS, Azure, HTTP, local)."""


def version_of(info: dict) -> str:
    """An object's version as its store's listing gives it ("" when it gives none)."""
    return str(next((info[f] for f in VERSION_FIELDS if info.get(f)), ""))


def mirror(url: str, cache: Path) -> Path:
    """A local copy of the folder `url` names, under `cache` (fetched only when the remote changed).
    The copy keeps the URL's last path component as its name (a task folder's name is its task's)."""
    import fsspec

    wanted = listing(url)
    base = cache / hashlib.sha256(url.encode()).hexdigest()[:16]
    target = base / (url.rstrip("/").rsplit("/", 1)[-1] or "root")
    record = base / LISTING
    if target.is_dir() and record.is_file() and json.loads(record.read_text()) == wanted:
        return target
    fs, root = fsspec.core.url_to_fs(url)
    partial = base / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    for rel in wanted:
        dest = partial / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        source = f"{root.rstrip('/')}/{rel}"
        retry(f"fetching {rel}", url, lambda source=source, dest=dest: fs.get_file(source, str(dest)))
    shutil.rmtree(target, ignore_errors=True)
    record.unlink(missing_ok=True)
    partial.rename(target)
    atomic_write_json(record, wanted)
    return target
