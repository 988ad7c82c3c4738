"""Benchmarks: Cascade side by side with the raw Python ceiling, libtorrent and aria2 (issue 5).

Run ``python -m bench [--quick] [--only CASE ...]``; see ``bench/run.py``.
Nothing here is imported by ``cascade``, ``tracker`` or ``peer``.
"""
