"""higr_dist.eval."""
