"""What the split needs to know about a JPEG without decoding it: its frame header and its end.

`jpeg_frame` reads one JPEG's segment headers up to the frame header (what
PIL's header parse tells, at a fraction of its cost); `jpeg_frames` does the
same for every image of a shard at once, in numpy, for the split's fast path.
Both give the same answer for every input (tested); `jpeg_frames` leaves the
rare JPEG with more segments than it walks to the per-image reader.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_SOF = np.isin(np.arange(256), sorted(SOF_MARKERS))
_STANDALONE = np.isin(np.arange(256), sorted(STANDALONE))


def jpeg_frame(raw: bytes | memoryview) -> tuple[int, int, int, int] | None:
    """(components, bits per sample, width, height) from a JPEG's frame header, by a marker scan.

    None when `raw` is not a well-formed JPEG up to its frame header.
    """
    if raw[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(raw)
    while pos + 4 <= end:
        if raw[pos] != 0xFF:
            return None
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = (raw[pos + 2] << 8) | raw[pos + 3]
        if length < 2:
            return None
        if marker in SOF_MARKERS:
            if pos + 10 > end:
                return None
            bits = raw[pos + 4]
            height = (raw[pos + 5] << 8) | raw[pos + 6]
            width = (raw[pos + 7] << 8) | raw[pos + 8]
            return raw[pos + 9], bits, width, height
        pos += 2 + length
    return None


def ends_with_eoi(raw: bytes | memoryview) -> bool:
    """Whether the JPEG ends with its end-of-image marker (trailing NUL/CR/LF/space allowed):
    a truncated JPEG does not."""
    end = len(raw)
    while end and raw[end - 1] in (0, 10, 13, 32):
        end -= 1
    return end >= 2 and raw[end - 2] == 0xFF and raw[end - 1] == 0xD9


class Frames(NamedTuple):
    """`jpeg_frame` of many images, as arrays (one entry per image).

    `known`: the scan finished (else the image needs `jpeg_frame`); where
    known, `found` says whether there is a frame header, and the four other
    arrays hold its fields (0 where there is none).
    """

    known: np.ndarray
    found: np.ndarray
    components: np.ndarray
    bits: np.ndarray
    width: np.ndarray
    height: np.ndarray


def jpeg_frames(data: np.ndarray, starts: np.ndarray, sizes: np.ndarray, max_segments: int = 24) -> Frames:
    """`jpeg_frame` of the images at data[starts[i]:starts[i] + sizes[i]], all at once.

    Each round reads one segment header of every image still being scanned:
    an encoder's JPEG reaches its frame header in 3 to 6 segments. Images not
    finished after `max_segments` rounds are left `known=False`.
    """
    count = len(starts)
    ends = starts + sizes
    state = np.zeros(count, np.int8)  # 0 scanning, 1 frame found, 2 no frame
    at = np.zeros(count, np.int64)  # where the frame header's marker lies, once found
    pos = starts + 2
    has_soi = sizes >= 2
    lead = np.where(has_soi, starts, 0)
    has_soi &= (data[lead] == 0xFF) & (data[np.minimum(lead + 1, len(data) - 1)] == 0xD8)
    state[~has_soi] = 2
    for _ in range(max_segments):
        scanning = np.flatnonzero(state == 0)
        if not scanning.size:
            break
        p = pos[scanning]
        room = p + 4 <= ends[scanning]
        q = np.where(room, p, 0)  # read nothing past an image's end
        first, marker = data[q], data[q + 1]
        length = (data[q + 2].astype(np.int64) << 8) | data[q + 3]
        fill = room & (first == 0xFF) & (marker == 0xFF)
        alone = room & (first == 0xFF) & _STANDALONE[marker]
        segment = room & (first == 0xFF) & ~fill & ~alone & (marker != 0xD9) & (marker != 0xDA) & (length >= 2)
        frame = segment & _SOF[marker]
        fits = frame & (p + 10 <= ends[scanning])
        state[scanning[~(fill | alone | segment) | (frame & ~fits)]] = 2
        state[scanning[fits]] = 1
        at[scanning[fits]] = p[fits]
        pos[scanning] = p + np.where(fill, 1, np.where(alone, 2, 2 + length))
    found = state == 1
    a = np.where(found, at, 0)
    field = lambda offset: np.where(found, data[a + offset], 0).astype(np.int64)
    return Frames(state != 0, found, field(9), field(4), field(7) << 8 | field(8), field(5) << 8 | field(6))
