"""The Cascade tracker: registers peers and lists them per file."""
