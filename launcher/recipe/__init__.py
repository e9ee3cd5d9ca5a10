"""The recipe: its schema, the YAML files it comes from, the rules across keys, and the model shapes and tasks a recipe names. Light: no torch, never reads a model folder."""
