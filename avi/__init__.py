"""avi: declarative deep attentive variational autoencoders, the Python API in one place.

    import avi
    spec = avi.load_spec("specs/quickstart.yaml", ["train.epochs=2"])   # validated, --set applied
    avi.train(spec, "runs/try")                                          # what `avi train` does
    run = avi.load_run("runs/try")              # a run directory, a .pt checkpoint or a .safetensors
    images = run.sample(16, temperature=0.8, seed=0)                     # [16, C, H, W] in [0, 1]
    run.evaluate(k=100, limit=100)["nll_nats"]                           # -log p(x), as `avi eval`

The names here are re-exported from the packages that do the work: avi_spec (the spec
language; it never imports torch) and builders (spec -> torch). Those stay importable on their
own; this package only gives them one front door. The torch side is imported on first use, so
`import avi` and the spec functions stay fast.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from avi_spec import SPEC_VERSION, ResolvedSpec, Spec, SpecError, load_document, load_spec, load_text

try:
    __version__ = version("avi")
except PackageNotFoundError:          # a source tree that was never installed
    __version__ = "unknown"

# name -> module that defines it; imported on first access (these modules import torch)
_LAZY = {
    "load_run": "builders.api",
    "TrainedRun": "builders.api",
    "train": "builders.api",
    "RunError": "builders.loading",
    "eval_images": "builders.evaluation.evaluate",
    "importance_sampled_nll": "builders.evaluation.evaluate",
    "kl_per_layer": "builders.evaluation.evaluate",
    "attention_maps": "builders.evaluation.evaluate",
    "build_model": "builders.network.build",
    "export_run": "builders.export",
    "load_exported": "builders.loading",
    "load_images": "builders.data.datasets",
    "DatasetError": "builders.data.datasets",
    "TrainingError": "builders.train.run_dir",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'avi' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value           # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "SPEC_VERSION", "ResolvedSpec", "Spec", "SpecError", "load_document",
           "load_spec", "load_text", *_LAZY]
