"""The Cascade peer: serves blocks it holds and fetches blocks it lacks."""
