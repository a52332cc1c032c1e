"""Test package, so helper modules import as ``tests.<name>`` (in worker processes too)."""
