"""higr_dist.models."""
