"""Making an init: the LInit runner, alpha calibration and the recipe every init carries."""
