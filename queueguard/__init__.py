"""queueguard: a spam-surge mail filter and queue guard."""

__version__ = "0.1.0"
