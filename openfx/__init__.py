"""OpenFx-compatible serverless platform: gateway, function watcher, CLI."""

__version__ = "0.1.0"
