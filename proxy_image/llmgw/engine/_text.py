"""Helpers for scanning streamed text for markers that may arrive split across deltas."""

from __future__ import annotations


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (not all of it): the text to hold back
    until the next delta says whether the marker is there. At most ``len(marker) - 1`` characters."""
    first = marker[0]
    at = text.find(first, max(0, len(text) - len(marker) + 1))
    while at >= 0:
        if marker.startswith(text[at:]):
            return len(text) - at
        at = text.find(first, at + 1)
    return 0
