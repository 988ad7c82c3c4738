"""Cascade: the ``.cascade`` metadata format and the wire protocol, as pure code."""

__version__ = "0.1.0"
