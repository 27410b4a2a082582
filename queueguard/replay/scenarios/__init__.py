"""Incident replays: one module per scenario, each with `run(scale, workdir) -> Summary`.

Run with `queueguard replay NAME` (see docs/replay.md).
"""
