"""Maintenance tools run from the command line (``python -m higr_dist.tools.<name>``)."""
