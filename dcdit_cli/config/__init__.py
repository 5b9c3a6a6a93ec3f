"""The recipe schema (``recipe.py`` with its typed fields, ``fields.py``), the checks of
command-line options (``options.py``) and the generator of docs/recipes.md (``recipe_docs.py``)."""
