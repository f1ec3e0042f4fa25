"""Dagster pieces, one file per kind; ``imgtune_assets.definitions`` assembles them."""
