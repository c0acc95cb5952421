"""MQTT-to-gRPC bridge: devices publish to topics, functions answer on reply topics, nothing is lost."""
