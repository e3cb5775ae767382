"""Shard lists as the compact brace patterns webdataset and open_clip_train read.

Why: the trainer takes its shards in one `--train-data` argument, and Linux caps
one argument at 128 KiB (MAX_ARG_STRLEN), about 3,000 absolute shard paths.
A LAION-size run has 40,000 expert shards or more, so the list is sent as
`dir/{00000..39999}.tar` patterns, joined by `::`, which webdataset's
`expand_urls` (split on `::`, then braceexpand) turns back into exactly the same
list in the same order: the trainer sees what it would have seen from the
long form, and its numbers do not change.

Pure functions; no files.
"""

from __future__ import annotations

import re

_NUMBERED = re.compile(r"^(?P<head>.*?)(?P<digits>\d+)(?P<tail>(?:\.[^./]*)*)$")  # the number before the suffixes
_SPECIAL = ("{", "}", "::", "\\", "${")  # braceexpand's syntax and escape, the list separator, WDS_ variables


def compact_shards(paths: list[str]) -> str:
    """`paths` as `::`-joined brace patterns that expand to the same list, in order.

    Consecutive paths that differ only in one zero-padded number of the same width
    (`.../00007.tar`, `.../00008.tar`) become one range `.../{00007..00008}.tar`;
    anything else stays as written. A path holding `{`, `}`, `::`, a backslash or
    `${` cannot be written so that the trainer reads it back, and is an error.
    """
    for path in paths:
        if any(token in path for token in _SPECIAL):
            raise ValueError(f"shard path {path!r} contains one of {' '.join(_SPECIAL)}, which the trainer's "
                             "--train-data parser would expand: rename the folder that holds it")
    parts: list[str] = []
    run: tuple[str, str, int, int, int] | None = None  # head, tail, width, first, last

    def close() -> None:
        if run is None:
            return
        head, tail, width, first, last = run
        if first == last:
            parts.append(f"{head}{first:0{width}d}{tail}")
        else:
            parts.append(f"{head}{{{first:0{width}d}..{last:0{width}d}}}{tail}")

    for path in paths:
        match = _NUMBERED.match(path)
        if match is None:
            close()
            run = None
            parts.append(path)
            continue
        head, digits, tail = match["head"], match["digits"], match["tail"]
        number, width = int(digits), len(digits)
        if run is not None and run[:3] == (head, tail, width) and number == run[4] + 1:
            run = (head, tail, width, run[3], number)
            continue
        close()
        run = (head, tail, width, number, number)
    close()
    return "::".join(parts)
