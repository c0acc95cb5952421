"""The function runtime ("watcher"): loads a user's `Handler` and serves it over FxWatcher gRPC."""
