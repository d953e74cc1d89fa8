"""The torch-free core: shapes, requests, plans, recipes, manifests, the artifact store, file helpers.

Everything the web process imports lives here (an import-linter contract keeps torch, transformers
and numpy out)."""
