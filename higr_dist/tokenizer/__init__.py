"""higr_dist.tokenizer: RQ-KMeans baseline, SID export with collision resolution, SID metrics.

- ``rq_kmeans``: residual k-means (streamed exact Lloyd) and ``fit_rq_kmeans`` (items -> export);
- ``export``: item table loading, collision counting/resolution, SID -> item index, the export;
- ``metrics``: collision, concentration, consistency, per-layer usage/perplexity.
"""

from higr_dist.tokenizer.export import (
    CollisionError,
    ItemTable,
    Resolution,
    build_sid_index,
    export_tokenizer,
    load_items,
    lookup_sids,
    resolve_collisions,
)
from higr_dist.tokenizer.metrics import (
    collision_rate,
    concentration,
    consistency,
    layer_usage,
    sid_report,
)
from higr_dist.tokenizer.rq_kmeans import RQKMeans, RQKMeansConfig, fit_rq_kmeans

__all__ = [
    "CollisionError", "ItemTable", "Resolution", "build_sid_index", "export_tokenizer",
    "load_items", "lookup_sids", "resolve_collisions", "collision_rate", "concentration",
    "consistency", "layer_usage", "sid_report", "RQKMeans", "RQKMeansConfig", "fit_rq_kmeans",
]
