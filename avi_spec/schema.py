"""The spec schema: every field an avi model, its data and its training can be given.

Field names follow docs/model.md; every field has a type, a default and a one-line
description (that description is what `avi schema` and docs/spec.md show). Unknown keys are
errors. Derived quantities (channel widths, latent resolution) are not fields: they are
computed from these by `avi_spec.derived` so that a spec cannot contradict itself.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SPEC_VERSION = 1


class _Strict(BaseModel):
    # allow_inf_nan=False: every float field refuses .inf and .nan (a learning rate of .inf
    # trains NaN weights); subclasses that set their own model_config inherit it.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class _KeysAndQueries(_Strict):
    """An attention whose queries are compared with its keys (key_dim and query_dim)."""

    @model_validator(mode="after")
    def _query_dim_defaults_to_key_dim(self):
        """A query_dim left out is key_dim (they must be equal), so stating key_dim alone is
        enough and the resolved document shows both. (An "after" validator: a "before" one
        would see the loader's strict JSON input as Python data, where strict validation
        refuses the string layer keys of `sources: {explicit: ...}`.)"""
        if "key_dim" in self.model_fields_set and "query_dim" not in self.model_fields_set:
            self.query_dim = self.key_dim
        return self


# ----------------------------------------------------------------------------- data

class Bernoulli(_Strict):
    kind: Literal["bernoulli"] = Field("bernoulli", description="Bernoulli likelihood for binary pixels (MNIST, OMNIGLOT).")
    crop: int = Field(2, ge=0, description="Border pixels (per side) left out of the likelihood: the padding added to 28x28 digits.")


class DiscretizedLogisticMixture(_Strict):
    kind: Literal["discretized_logistic_mixture"] = Field(
        "discretized_logistic_mixture", description="Discretized logistic mixture for 8-bit images (CIFAR-10).")
    mixtures: int = Field(5, ge=1, le=64, description="Number of mixture components (the paper uses 5, NVAE 10).")
    upper_edge: float = Field(0.99, gt=0.0, lt=1.0, description="Values above this are scored as the open top bin; 0.99 reproduces NVAE/the paper, 0.999 is the exact PixelCNN++ edge.")
    min_log_scale: float = Field(-7.0, description="Lower clamp of the per-component log-scales.")


Distribution = Annotated[Union[Bernoulli, DiscretizedLogisticMixture], Field(discriminator="kind")]


class ImageShape(_Strict):
    channels: int = Field(1, ge=1, le=4, description="Colour channels of the raw images (1 grey, 3 RGB).")
    size: int = Field(28, ge=4, le=1024, description="Side of the raw (square) images, before padding.")


class Flips(_Strict):
    horizontal: bool = Field(True, description="Random left-right flip of training images.")
    vertical: bool = Field(True, description="Random up-down flip of training images (the reference code does it for CIFAR-10).")


class Folder(_Strict):
    fit: Literal["center_crop", "exact"] = Field("center_crop", description="Image files (JPEG, PNG, WebP, BMP, TIFF) of another size: center_crop resizes the shorter side to data.image.size (Pillow, Lanczos) and cuts the centre square; exact refuses them. .npy arrays are always taken as they are.")
    convert: bool = Field(True, description="Convert image files to data.image.channels (1: grey by ITU-R 601 luma, 3: RGB, grey replicated; alpha dropped); false refuses files of another colour mode.")
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="When root has no train/ and test/ folders: the share of every class sub-folder (or of the flat folder) drawn for the test split.")
    split_seed: int = Field(0, ge=0, le=(1 << 32) - 1, description="Seed of that drawn split (the same files and seed give the same split on every machine).")
    cache: bool = Field(True, description="Decode image files once into root/.avi_cache/ (or ~/.cache/avi when root is read-only): a memory-mapped .npy per split, remade when any file's name, size or modification time changes.")


class Data(_Strict):
    dataset: Literal["mnist5k", "mnist", "omniglot", "cifar10", "folder"] = Field(
        "mnist5k", description="Which data: mnist5k (5,000 digits shipped with avi), mnist (IDX files), omniglot (chardata.mat), cifar10 (python batches) or folder: the user's own images (see data.folder).")
    root: Optional[str] = Field(None, description="Folder holding the dataset's standard files (relative to the working directory), or for omniglot the .mat file itself; not needed for mnist5k. Only the commands that read data (train, eval, reconstruct) need it: a spec without it validates and builds.")
    image: ImageShape = Field(default_factory=ImageShape, description="Shape of the raw images.")
    pad: int = Field(2, ge=0, le=64, description="Zero pixels added on every side before the encoder (28 -> 32 for the binary datasets).")
    binarize: Literal["dynamic", "none"] = Field(
        "dynamic", description="dynamic: resample every training pixel as Bernoulli(grey level) at every draw (test set: once, fixed seed); none: keep 8-bit values.")
    flips: Optional[Flips] = Field(None, description="Training-time flips (augmentation); null for none.")
    transpose: bool = Field(False, description="Swap rows and columns of every image after loading. The authors' code reads OMNIGLOT's chardata.mat row-major, so their models saw every character transposed; avi import-davi sets this for their OMNIGLOT runs.")
    distribution: Distribution = Field(default_factory=Bernoulli, description="The data distribution p(x | z).")
    folder: Folder = Field(default_factory=Folder, description="How dataset: folder reads the user's own images (16-bit images are reduced to 8 bits, the precision the likelihoods score).")

    @field_validator("root")
    @classmethod
    def _a_path(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and "\0" in v:
            raise ValueError("data.root must be a folder path, without NUL characters")
        return v


# ------------------------------------------------------------------------ hierarchy

class LatentShape(_Strict):
    channels: int = Field(20, ge=1, le=4096, description="Latent channels Z of every stochastic layer.")
    size: int = Field(16, ge=1, le=1024, description="Side S of every layer's latent grid; must equal the padded image side / 2^(number of down-sampling blocks in preprocess).")


class GaussianLayer(_Strict):
    log_scale: tuple[float, float] = Field((-5.0, 5.0), description="Bounds (lo, hi) of the log standard deviation: tanh bound when lo = -hi, smoothstep otherwise.")
    noise: float = Field(0.0, ge=0.0, description="Std of Gaussian noise added to the raw log-scale during training (0 for none).")

    @field_validator("log_scale")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"log_scale must be [lo, hi] with lo < hi, got [{v[0]}, {v[1]}]")
        return v


class Posterior(GaussianLayer):
    residual: bool = Field(True, description="Parameterise the posterior relative to the prior (NVAE-style residual), as the paper does.")


class Hierarchy(_Strict):
    layers: int = Field(16, ge=1, le=256, description="Number of stochastic layers L (layer 0 is the top, sampled first).")
    latent: LatentShape = Field(default_factory=LatentShape, description="Shape of every layer's latent tensor.")
    posterior: Posterior = Field(default_factory=Posterior, description="The posterior q(z_l | x, z_<l).")
    prior: GaussianLayer = Field(default_factory=GaussianLayer, description="The prior p(z_l | z_<l) of layers l >= 1 (layer 0 is N(0, I)).")
    scale: Literal["exp", "softplus"] = Field(
        "exp", description="How a bounded log-scale s becomes a standard deviation (posterior and prior): exp = exp(s) + 0.01 (the paper); softplus = log2(1 + 2^s) + 0.01, Efficient-VDVAE's gradient smoothing (softplus with beta = ln 2: 1 at s = 0 like exp, but linear rather than exponential above it, so a large log-scale cannot blow up the KL's gradient).")


# ---------------------------------------------------------------------------- cells

class NonLocal(_KeysAndQueries):
    key_dim: int = Field(32, ge=1, le=4096, description="Key size of the spatial self-attention (non-local) block.")
    query_dim: int = Field(32, ge=1, le=4096, description="Query size; dot products need it equal to key_dim (default: key_dim).")


class CellGroup(_Strict):
    type: Literal["residual"] = Field("residual", description="Cell type: residual = BN-swish-conv3x3 nodes with a 0.1-scaled residual (the paper's cell).")
    scales: list[Literal[-2, 0, 2]] = Field([0, 0], min_length=1, max_length=64, description="One entry per residual block: 0 keeps the size, -2 halves it (doubling channels), 2 doubles it (halving channels).")
    nodes: int = Field(2, ge=1, le=16, description="BN-swish-conv nodes per residual block.")
    nonlocal_: Optional[NonLocal] = Field(None, alias="nonlocal", description="Non-local block inside every node (and the up-sampling shortcut); null for none.")

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)


class Preprocess(CellGroup):
    scales: list[Literal[-2, 0, 2]] = Field([0, -2], min_length=1, max_length=64, description="One entry per residual block; every -2 halves the resolution and doubles the channels.")
    filters: int = Field(128, ge=1, le=65536, description="Stem width F_pre at image resolution; the bottom-up width is C_E = F_pre * 2^P (P = number of -2 blocks).")


class Decoder(CellGroup):
    filters: int = Field(128, ge=1, le=65536, description="Base width F_dec; the top-down context width is C_D = F_dec * 2^P.")


class Postprocess(CellGroup):
    scales: list[Literal[-2, 0, 2]] = Field([2, 0], min_length=1, max_length=64, description="One entry per residual block; every 2 doubles the resolution and halves the channels.")


class Merge(_Strict):
    nonlocal_: Optional[NonLocal] = Field(None, alias="nonlocal", description="Non-local block at the merge output; null for none.")
    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)


class Cells(_Strict):
    preprocess: Preprocess = Field(default_factory=Preprocess, description="Stem and down-sampling blocks from the image to the latent resolution.")
    encoder: CellGroup = Field(default_factory=CellGroup, description="The bottom-up cell of every layer.")
    decoder: Decoder = Field(default_factory=Decoder, description="The top-down cell of every layer >= 1.")
    topdown_merge: Merge = Field(default_factory=Merge, description="Merge of the previous context with the previous latent (every layer >= 1 and once at the end).")
    bottomup_merge: Merge = Field(default_factory=Merge, description="Merge of a layer's bottom-up features with its prior condition (layers >= 1).")
    postprocess: Postprocess = Field(default_factory=Postprocess, description="Up-sampling blocks from the latent resolution back to the image.")


# ------------------------------------------------------------------------ attention

class LastK(_Strict):
    last: int = Field(..., ge=1, le=256, description="Attend only to the k nearest candidate layers.")


class Explicit(_Strict):
    explicit: dict[int, list[int]] = Field(..., description="Per layer, the exact list of layers it attends to; layers not listed attend to all.")


Sources = Union[Literal["all"], LastK, Explicit]


class DepthwiseAttention(_KeysAndQueries):
    key_dim: int = Field(20, ge=1, le=4096, description="Channels of the keys the cells emit.")
    query_dim: int = Field(20, ge=1, le=4096, description="Channels of the queries; must equal key_dim (default: key_dim).")
    layer_norm: bool = Field(True, description="Normalise with x + GELU(LayerNorm(x)) (Eq. 5-6).")
    learn_temperature: bool = Field(False, description="Learn the softmax temperature. The paper's models kept it at 1 (the Keras of their time did not track it); their code on TF >= 2.5 learns it, and avi import-davi sets this for such runs.")
    sources: Sources = Field("all", description="Which layers each layer may attend to: all (the paper), {last: k}, or {explicit: {layer: [layers]}}.")


class Attention(_Strict):
    generative: Optional[DepthwiseAttention] = Field(None, description="Depth-wise attention of the prior over the contexts of the layers above (Sec. 2.4); null for none.")
    inference: Optional[DepthwiseAttention] = Field(None, description="Depth-wise attention of the posterior over the bottom-up features at and below (Sec. 2.5); null for none.")


# ------------------------------------------------------------------------- training

class Optimizer(_Strict):
    name: Literal["adamax", "adam", "adamw"] = Field("adamax", description="Optimizer (the paper: Adamax).")
    lr: float = Field(0.01, gt=0.0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam-family betas.")
    eps: float = Field(1e-3, gt=0.0, description="Adam-family epsilon.")
    eps_mode: Literal["keras", "torch"] = Field(
        "keras", description="Adamax only: keras adds eps to the denominator (u + eps, the reference code); torch puts it inside the max, as torch.optim.Adamax.")
    l2: float = Field(1.5e-4, ge=0.0, description="L2 strength on conv weights, log-magnitudes, biases and batch-norm parameters (loss + l2 * w^2).")
    l2_attention: float = Field(0.01, ge=0.0, description="L2 strength on attention layer norms, attention/non-local gammas and the layer-0 constant.")


class Schedule(_Strict):
    name: Literal["cosine", "cosine_restart", "constant"] = Field("cosine", description="Learning-rate schedule after warm-up. The rate is set every step; after warm-up it changes once per schedule epoch of floor(N / batch_size) steps (the authors' lr_steps_per_epoch) while an epoch runs ceil(N / batch_size) steps, so where the batch does not divide N the change comes one step earlier every epoch (docs/model.md section 9).")
    warmup_epochs: float = Field(5.0, ge=0.0, description="Linear warm-up length, per step, from warmup_start_lr to lr.")
    warmup_start_lr: float = Field(1e-4, ge=0.0, description="Learning rate the warm-up starts from (schedule step 0); the first optimizer step already takes one increment, as in the authors' code.")
    min_lr: float = Field(1e-4, ge=0.0, description="Learning rate at the end of a cosine cycle.")
    first_cycle_epochs: float = Field(300.0, gt=0.0, description="cosine_restart: length of the first cycle (epochs).")
    cycle_mult: float = Field(2.0, ge=1.0, description="cosine_restart: growth of each next cycle's length.")


class KLWarmup(_Strict):
    epochs: float = Field(16.0, ge=0.0, description="Epochs over which beta rises linearly to 1 (changes once per epoch).")
    start: float = Field(0.1, ge=0.0, le=1.0, description="beta at epoch 0.")


class EMA(_Strict):
    decay: float = Field(0.9999, gt=0.0, lt=1.0, description="Decay of the exponential moving average of the weights used for evaluation and sampling.")


class Train(_Strict):
    batch_size: int = Field(32, ge=1, description="Global batch size: images per optimizer step (split across processes, then into train.accumulate micro-batches).")
    accumulate: int = Field(1, ge=1, le=4096, description="Gradient accumulation: each process runs its share of a batch as this many micro-batches (forward and backward each), then takes one optimizer step, so batch_size: 40, accumulate: 4 on one GPU holds 10 images at a time and updates as the paper's 40. batch_size must be divisible by processes x accumulate; batch-norm statistics are per micro-batch.")
    sync_batch_norm: bool = Field(False, description="With several processes, batch norm normalises by the statistics of the whole global batch (summed across processes) instead of each process's share, so that N processes train what one process trains on the same batch. false: per-process statistics, as the authors' multi-GPU runs. No effect with one process.")
    epochs: int = Field(400, ge=1, description="Training epochs.")
    optimizer: Optimizer = Field(default_factory=Optimizer, description="Optimizer and L2 regularisation.")
    schedule: Schedule = Field(default_factory=Schedule, description="Learning-rate schedule.")
    kl_warmup: KLWarmup = Field(default_factory=KLWarmup, description="KL warm-up (beta schedule).")
    grad_clip: Optional[float] = Field(None, gt=0.0, description="Clip the global gradient norm to this value; null for none (the paper).")
    max_skipped: int = Field(100, ge=1, description="Abort after this many consecutive non-finite updates (each one is skipped and counted).")
    ema: Optional[EMA] = Field(None, description="Exponential moving average of the weights; null for none.")
    seed: int = Field(0, ge=-(1 << 63), le=(1 << 63) - 1,    # torch seeds overflow past 64 bits
                      description="Seed of weights, data order, binarisation and sampling.")
    log_every: int = Field(50, ge=1, description="Write a metrics line every this many steps.")
    sample_every: int = Field(1, ge=1, description="Write a sample grid every this many epochs.")
    checkpoint_every: int = Field(500, ge=1, description="Write checkpoints/last.pt every this many steps (and at every epoch end).")
    precision: Literal["auto", "fp32", "bf16"] = Field("fp32", description="fp32: full precision, as the paper trained (the default); bf16: bf16 autocast, faster on GPUs, opt-in; auto: bf16 on CUDA, fp32 on the CPU.")
    compile: bool = Field(False, description="Wrap the model in torch.compile.")


class Eval(_Strict):
    importance_samples: int = Field(100, ge=1, description="Importance samples K for the marginal likelihood.")
    batch_size: int = Field(16, ge=1, description="Test images per evaluation batch.")


# ----------------------------------------------------------------------------- spec

class Spec(_Strict):
    version: int = Field(SPEC_VERSION, ge=1, description="Spec format version; older versions are upgraded on load.")
    name: str = Field("model", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$", description="Run name (default: the spec file's name).")
    description: str = Field("", description="Free text: what this configuration is.")
    data: Data = Field(default_factory=Data, description="Dataset, preprocessing and data distribution.")
    hierarchy: Hierarchy = Field(default_factory=Hierarchy, description="Stochastic layers.")
    cells: Cells = Field(default_factory=Cells, description="Residual cell groups and merges.")
    attention: Attention = Field(default_factory=Attention, description="Depth-wise attention of the prior and the posterior.")
    train: Train = Field(default_factory=Train, description="Training recipe.")
    eval: Eval = Field(default_factory=Eval, description="Evaluation settings.")

    @field_validator("name")
    @classmethod
    def _one_folder(cls, v: str) -> str:
        """The name becomes runs/<name>: the pattern keeps it one path component of safe
        characters, and "." or ".." would name the runs folder or its parent."""
        if v in (".", ".."):
            raise ValueError(f"'{v}' cannot be a run name (the name becomes a run directory); "
                             f"use letters, digits, '_', '.' or '-'")
        return v

    @model_validator(mode="after")
    def _version_supported(self) -> "Spec":
        if self.version > SPEC_VERSION:
            raise ValueError(f"spec version {self.version} is newer than this avi supports ({SPEC_VERSION}); upgrade avi")
        return self


# ----------------------------------------------------------------- JSON Schema

def json_schema() -> dict:
    """The JSON Schema of a spec *file* (what `avi schema` prints, for editors): the Spec
    fields, plus the keys the loader reads before validation: `extends` (the parent spec,
    merged under this file) and `version` (files of older versions are upgraded). Every field
    has a default, so the partial files that `extends` makes possible validate as well."""
    schema = Spec.model_json_schema(by_alias=True)
    schema["properties"] = {
        "extends": {"type": "string", "minLength": 1, "title": "Extends",
                    "description": "Path of the spec this one derives from, relative to this file; "
                                   "its fields are merged under this file's (this file wins)."},
        **schema["properties"],
    }
    return schema
