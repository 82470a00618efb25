"""The recipes shipped with surgery (YAML package data, installed as ``surgery_recipes``).

``surgery recipes`` lists them; ``--recipe NAME`` and ``surgery sweep NAME`` find them by name."""
