"""The recipe: its sections (schema), the YAML files it comes from, the rules across keys, the
registry of built-in model families, and the shapes and tasks a recipe names.

Light (no torch) and self-contained: nothing here imports the plan or reads a model folder.
"""
