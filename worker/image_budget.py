"""Which task images to remove when an engine's images take more than the budget.

A pure rule, kept apart so it can be read in one place (docs/images.md):

- only images toolq used as task images on this engine are candidates (those in
  ``Keys.engine_images``: an operator's other images are never touched), and
  only when every name the image has is one of them;
- never an image a container was created from (any container on the engine,
  running or not, warm or packed), one this worker is starting a container of,
  one being pulled, nor the default image (``protected``);
- never one whose removal frees nothing (all its layers shared with others);
- least recently used first, until the bytes removal frees bring the total
  within the budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """An image as the engine reports it (``docker_images.ImageFact``)."""

    @property
    def refs(self) -> tuple[str, ...]: ...

    @property
    def unique_bytes(self) -> int: ...

    @property
    def in_use(self) -> bool: ...


C = TypeVar("C", bound=Candidate)


def victims(
    total_bytes: int,
    budget_bytes: int,
    images: Iterable[C],
    last_used_ms: Mapping[str, int],
    protected: set[str],
) -> list[C]:
    """The images to remove, least recently used first (empty: within the budget)."""
    over = total_bytes - budget_bytes
    if over <= 0:
        return []
    candidates = [
        image
        for image in images
        if image.refs
        and all(ref in last_used_ms for ref in image.refs)
        and not image.in_use
        and not protected.intersection(image.refs)
        and image.unique_bytes > 0
    ]
    candidates.sort(key=lambda image: max(last_used_ms[ref] for ref in image.refs))
    picked = []
    for image in candidates:
        if over <= 0:
            break
        picked.append(image)
        over -= image.unique_bytes
    return picked
