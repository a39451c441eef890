"""higr_dist.stages."""
