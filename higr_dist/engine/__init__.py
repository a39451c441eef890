"""higr_dist.engine."""
