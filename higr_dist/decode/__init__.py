"""higr_dist.decode."""
