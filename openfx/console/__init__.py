"""The operator's console: a web page on its own origin, served by the gateway process."""
