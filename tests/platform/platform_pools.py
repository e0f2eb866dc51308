"""The pools the platform tests use: the real ones from metaray.cluster."""
from metaray.cluster import InProcessPool as LocalPool  # noqa: F401
from metaray.cluster import WorkerPool  # noqa: F401
