"""KETI OpenFx's `mesh` module, so a KETI handler's `import mesh` works unchanged.

KETI's Python runtime puts `mesh.py` beside the handler; `mesh_call(functionName, input)` calls
another function and returns its output as bytes. Here it is a thin shim over `openfx.fn.call`
(through the gateway, with the remaining deadline and the hop limit), which is what new code
should use. The watcher appends this folder to `sys.path` after the handler's own, so a handler
that ships its own `mesh.py` keeps it.
"""

from openfx import fn


def mesh_call(functionName, input):  # noqa: A002, N803 - KETI's names, kept for keyword callers
    return fn.call(functionName, input)
