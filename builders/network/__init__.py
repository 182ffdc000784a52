"""The model: the hierarchy (model.py), how a spec builds it (build.py) and its parts."""
