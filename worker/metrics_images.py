"""Task image metrics: the hooks (``ImageHooks``, no-ops, part of ``Observer``) and
their Prometheus series (``ImageMetrics``, part of ``WorkerMetrics``).

No image name is a label: a training run names thousands of images.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PULL_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ImageHooks:
    """Image hooks of a worker and its Docker backend. Every hook is a no-op here."""

    def image_pulled(self, seconds: float, ok: bool) -> None:
        """The engine finished pulling an image in ``seconds`` (``ok``: it has it)."""

    def open_waited_for_pull(self, seconds: float) -> None:
        """A container start waited ``seconds`` for its image's pull."""

    def images_sampled(self, *, held: int, pulling: int) -> None:
        """The engine's images (tags and digests) and the pulls in flight."""

    def open_left_to_holder(self) -> None:
        """An open was put in the inbox of a worker holding its image (``worker/images.py``)."""

    def image_prefetched(self) -> None:
        """A pull started for the image of an open still waiting."""

    def image_removed(self, size_bytes: int) -> None:
        """The image budget removed an image that freed ``size_bytes``."""

    def image_warm_hit(self) -> None:
        """An open of a task image took a container its warm pool had started."""


class ImageMetrics(ImageHooks):
    """Prometheus series of the image hooks; ``define_image_metrics`` creates them."""

    def define_image_metrics(self, r: CollectorRegistry) -> None:
        """Create the image metrics in registry ``r``."""
        self.image_pull_s = Histogram(
            "toolq_image_pull_seconds",
            "Image pulls by this worker's engine, by outcome (ok, failed).",
            ["outcome"],
            buckets=PULL_BUCKETS_S,
            registry=r,
        )
        self.pull_waits_s = Histogram(
            "toolq_image_pull_wait_seconds",
            "Container starts that waited for their image's pull, and how long.",
            buckets=PULL_BUCKETS_S,
            registry=r,
        )
        self.images_held = Gauge(
            "toolq_images_held", "Image names (tags, digests) the engine holds.", registry=r
        )
        self.images_pulling = Gauge(
            "toolq_images_pulling", "Images the engine is pulling now.", registry=r
        )
        self.opens_left = Counter(
            "toolq_image_opens_left",
            "Opens this worker left to a worker holding their image.",
            registry=r,
        )
        self.prefetches = Counter(
            "toolq_image_prefetches", "Pulls started for images of waiting opens.", registry=r
        )
        self.images_removed = Counter(
            "toolq_images_removed", "Images the image budget removed.", registry=r
        )
        self.image_removed_bytes = Counter(
            "toolq_image_removed_bytes", "Bytes the image budget freed.", registry=r
        )
        self.image_warm_hits = Counter(
            "toolq_image_warm_hits",
            "Opens of task images that took a container of their image's warm pool.",
            registry=r,
        )

    def image_pulled(self, seconds: float, ok: bool) -> None:
        self.image_pull_s.labels("ok" if ok else "failed").observe(seconds)

    def open_waited_for_pull(self, seconds: float) -> None:
        self.pull_waits_s.observe(seconds)

    def images_sampled(self, *, held: int, pulling: int) -> None:
        self.images_held.set(held)
        self.images_pulling.set(pulling)

    def open_left_to_holder(self) -> None:
        self.opens_left.inc()

    def image_prefetched(self) -> None:
        self.prefetches.inc()

    def image_removed(self, size_bytes: int) -> None:
        self.images_removed.inc()
        self.image_removed_bytes.inc(size_bytes)

    def image_warm_hit(self) -> None:
        self.image_warm_hits.inc()
