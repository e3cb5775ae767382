"""Held-out images that are new: no near-duplicate of a training image in any evaluation task.

A near-duplicate is an image that matches a training image twice over: its
8 x 8 colour thumbnail within `NEAR_COLOUR` (mean absolute difference,
0-255 scale) and its 16 x 16 grey thumbnail within `NEAR_GREY`: the same
picture, whatever JPEG noise or a pixel here and there says. The grey check
is what tells two fine textures of the same colours apart, whose colour
thumbnails both average to one blend. Exact hashes (what moda checked
before) miss near-duplicates, and the scenes domain then gave mostly
near-copies of training images, so its accuracy measured recall.

Memory: 448 bytes a training image (90 MB at 200,000). A check compares only
with the images whose channel means are within 3 x NEAR_COLOUR of the
probe's (no other can be within NEAR_COLOUR), so it stays fast at any size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

NEAR_COLOUR = 3.0
NEAR_GREY = 6.0
CHANNEL_BOUND = 3 * NEAR_COLOUR  # a mean abs difference <= d bounds each channel mean's by 3 d


def colour_thumbnail(image: Image.Image) -> np.ndarray:
    """(192,) uint8: the image averaged down to 8 x 8 pixels, channels last."""
    return np.asarray(image.convert("RGB").resize((8, 8), Image.BOX), dtype=np.uint8).reshape(-1)


def grey_thumbnail(image: Image.Image) -> np.ndarray:
    """(256,) uint8: the image in grey averaged down to 16 x 16 pixels."""
    return np.asarray(image.convert("L").resize((16, 16), Image.BOX), dtype=np.uint8).reshape(-1)


class Thumbnails:
    """The images seen so far, and whether a new one is a near-duplicate of one of them."""

    def __init__(self) -> None:
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._colour = np.zeros((0, 192), np.uint8)
        self._grey = np.zeros((0, 256), np.uint8)
        self._means = np.zeros((0, 3))

    def add(self, image: Image.Image) -> None:
        self._pending.append((colour_thumbnail(image), grey_thumbnail(image)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(colour (n, 192), grey (n, 256)) thumbnails of every image added, in order: what a process
        that drew some of the images hands back (448 bytes an image)."""
        self._flush()
        return self._colour, self._grey

    def extend(self, colour: np.ndarray, grey: np.ndarray) -> None:
        """Add thumbnails another Thumbnails' `arrays()` gave, after those already here."""
        self._pending += list(zip(colour, grey))

    def __len__(self) -> int:
        return len(self._colour) + len(self._pending)

    def _flush(self) -> None:
        if self._pending:
            colour, grey = (np.stack(parts) for parts in zip(*self._pending))
            self._colour = np.concatenate([self._colour, colour])
            self._grey = np.concatenate([self._grey, grey])
            self._means = np.concatenate([self._means, colour.reshape(len(colour), -1, 3).mean(axis=1)])
            self._pending = []

    def nearest(self, image: Image.Image) -> tuple[float, float]:
        """(colour, grey) mean absolute differences to the seen image nearest in colour among those
        within reach ((inf, inf) when none is)."""
        self._flush()
        colour, grey = colour_thumbnail(image), grey_thumbnail(image)
        means = colour.reshape(-1, 3).mean(axis=0)
        close = np.flatnonzero((np.abs(self._means - means) <= CHANNEL_BOUND).all(axis=1))
        if not close.size:
            return float("inf"), float("inf")
        colour_d = np.abs(self._colour[close].astype(np.int16) - colour.astype(np.int16)).mean(axis=1)
        grey_d = np.abs(self._grey[close].astype(np.int16) - grey.astype(np.int16)).mean(axis=1)
        twice = np.flatnonzero(colour_d <= NEAR_COLOUR)
        best = twice[np.argmin(grey_d[twice])] if twice.size else int(np.argmin(colour_d))
        return float(colour_d[best]), float(grey_d[best])

    def is_new(self, image: Image.Image) -> bool:
        colour, grey = self.nearest(image)
        return not (colour <= NEAR_COLOUR and grey <= NEAR_GREY)
