"""Model editing: MEMIT (mass editing) and WISE (lifelong editing), through TransformerLens hooks."""
