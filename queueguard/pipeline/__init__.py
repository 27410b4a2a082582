"""The transport-independent pipeline: one Session per connection owns each transaction.

Front ends translate their protocol into Session calls and the verdicts back
(docs/architecture.md); checks report rule hits (queueguard/stage.py) and
queueguard/resolve.py turns them into verdicts.
"""

from queueguard.pipeline.pipeline import Pipeline
from queueguard.pipeline.session import End, Outcome, Session

__all__ = ["End", "Outcome", "Pipeline", "Session"]
