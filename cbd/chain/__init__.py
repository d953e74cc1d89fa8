"""Chain building: anchor by anchor (prune, distil, store, resume), anchor zero from a foreign model."""
