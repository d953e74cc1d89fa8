"""The chain recipes (one TOML file per chain), shipped as package data: ``importlib.resources.files("anchors")``."""
