"""Components only tests start (Postfix, Redis, miltertest); the shared ones are `queueguard.harness`."""
