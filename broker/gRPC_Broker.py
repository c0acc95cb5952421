"""The workshop's MQTT connector, kept as its command line:

    python broker/gRPC_Broker.py <topic> <function>

subscribes to <topic> (wildcards allowed) on the broker at $MQTT_HOST:$MQTT_PORT
(127.0.0.1:1883) and invokes <function> through the gateway at $OPENFX_URL (127.0.0.1:31113)
for every message, answering on the MQTT 5 response topic or <topic>/reply. It is the full
bridge (openfx.bridge) with one route; use `python -m openfx.bridge -c broker/bridge.yaml` for many.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from openfx.bridge.__main__ import main  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 3:
        print("Input Command : python gRPC_Broker.py [Connect Topic] [Serverless function]")
        sys.exit(2)
    topic, function = sys.argv[1], sys.argv[2]
    main(
        [
            "--host",
            os.environ.get("MQTT_HOST", "127.0.0.1"),
            "--port",
            os.environ.get("MQTT_PORT", "1883"),
            "--gateway",
            os.environ.get("OPENFX_URL", "127.0.0.1:31113"),
            "--client-id",
            os.environ.get("MQTT_CLIENT_ID", f"openfx-bridge-{topic.replace('/', '_')}"),
            "--route",
            f"{topic}={function}",
            "--metrics",
            os.environ.get("BRIDGE_METRICS", ""),
            *sys.argv[3:],
        ]
    )
