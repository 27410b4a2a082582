"""ClamAV scanning under memory backpressure: clamd client, admission gate, pressure governor, health."""
