"""Queue watch: MTA and Mailman queues, spool filesystems, daemons, downstreams.

Everything here is cheap on a queue of 100,000 messages: queues are counted
with `os.scandir` and ages come from the file names (Exim ids, Postfix long
ids and Mailman file names carry their arrival time); message files are never
parsed, and `exim -bpc` / `postqueue -j` are never run.
"""
