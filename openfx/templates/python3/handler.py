def Handler(req):
    """Called once per request.

    req.input is the request body (bytes); req.info.FunctionName and
    req.info.Trigger.Name say who called: "grpc" or "http" for a client's own
    call, else the trigger's kind ("mqtt", "schedule"; .Trigger.Topic: the MQTT
    topic or the cron line). Return str, bytes, None or (body, content_type).
    Raise ValueError for bad input (the caller gets INVALID_ARGUMENT / HTTP
    400); any other exception is INTERNAL / HTTP 500.
    For one-time set-up (loading a model), write `class Handler` with
    `__init__(self)` and `__call__(self, req)` instead. A plain `def` runs in a
    thread pool and may block; `async def Handler(req)` runs on the event loop
    and must never block (await its I/O).
    """
    return b"Hello from OpenFx: " + req.input
