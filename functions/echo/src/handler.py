def Handler(req):
    """Return the input unchanged (byte-identical)."""
    return req.input
