"""Functions composing: crawl a page, then score the sentiment of each of its headlines.

Input: what `crawler` takes (a URL, JSON `{"url", "selector", "limit"}`, or nothing for its
default page). Output: one `<n>,<polarity>,<headline>` line per headline, polarity from -1 to 1.

Each step is another function called with `fn.call(name, data)` (KETI's `mesh.mesh_call` is the
same call): through the gateway, so each callee's limits, authentication and metrics apply, with
what is left of this call's deadline, and a callee's error comes back as this function's error.
"""

import json

from openfx import fn


def Handler(req):
    lines = fn.call("crawler", req.input).decode().splitlines()
    headlines = [line.partition(",")[2] for line in lines if "," in line]
    if not headlines:
        return ""
    # one call scores every headline (sentiment-analysis takes {"texts": [...]})
    scores = json.loads(fn.call("sentiment-analysis", json.dumps({"texts": headlines})))
    return "".join(f"{n},{s['polarity']:+.2f},{s['text']}\n" for n, s in enumerate(scores, 1))
