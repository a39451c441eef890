"""higr_dist.tokenizer."""
