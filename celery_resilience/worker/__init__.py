"""The worker side: the bootsteps, the ledger of what a worker holds, the reclaimer, the
prefork pool that keeps its jobs, and the garbage-collector freeze."""
