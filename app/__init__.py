"""The FastAPI edge: validation, plan, enqueue or serve. Imports only torch-free modules."""
