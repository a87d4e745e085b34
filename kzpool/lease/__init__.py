"""The lease core: what every client of the pool (blocking, asyncio, kombu) keeps of a lease
and follows to get one, with no client's interface and no I/O of its own."""
