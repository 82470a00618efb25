"""Recipes: versioned YAML validated into dataclasses (:mod:`.recipe`), the recipes shipped with
surgery found by name (:mod:`.catalog`), and the hash of the recipe values behind each sweep step
(:mod:`.settings`)."""
