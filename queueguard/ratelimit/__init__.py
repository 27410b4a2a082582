"""Rate limits: GCRA over a narrow storage protocol, with memory and Redis backends."""
