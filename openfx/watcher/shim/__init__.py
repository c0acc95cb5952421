"""Modules a handler imports by their bare names (KETI's `mesh`); the watcher puts this folder on sys.path."""
