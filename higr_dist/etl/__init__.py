"""higr_dist.etl."""
