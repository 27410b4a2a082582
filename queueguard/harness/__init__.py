"""Real components on loopback (Exim, clamd, SMTP sinks, `queueguard serve`) for replays and tests.

In the package, not under tests/, because `queueguard replay` starts them from
an installed wheel; the test suite and the benchmarks import them from here.
Components only tests use (Postfix, Redis, miltertest) stay in tests/components/.
"""
