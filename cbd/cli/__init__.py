"""The cbd command line."""
