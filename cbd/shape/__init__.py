"""The shape math: weight-role tables, importance, maps between shapes, Trans and LInit."""
