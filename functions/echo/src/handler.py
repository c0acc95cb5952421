async def Handler(req):
    """Return the input unchanged (byte-identical).

    `async def`: it never blocks, so the watcher runs it on its event loop, without a thread
    hand-off per call (plain `def` handlers run in a thread pool).
    """
    return req.input
