"""The trained tiny model's world: captioned shapes drawn on the fly (data) and the caption check (evaluate)."""
