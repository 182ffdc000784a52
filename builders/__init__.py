"""builders: avi spec -> torch modules, data, training and evaluation.

The Python API's front door is the `avi` package (`import avi; avi.load_run(...)`), which
re-exports builders.api and the rest; `from builders import load_run` works too. It is
imported lazily so that importing a single builders module does not pull in the others.
"""


def __getattr__(name: str):
    if name in ("load_run", "TrainedRun"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'builders' has no attribute {name!r}")


__all__ = ["load_run", "TrainedRun"]
