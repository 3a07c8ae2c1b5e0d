"""Typed, validated run configuration (YAML file + ``key=value`` overrides).

Every section is a pydantic model that forbids unknown keys, so a typo fails at start-up with
the key's dotted path and the keys that are allowed, instead of being silently ignored.
Presets shipped in ``mtpsl/presets/*.yaml`` are named by their stem (``--config nyuv2_onelabel``).
"""

from __future__ import annotations

import math
import re
import stat
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mtpsl.core.errors import ConfigError
from mtpsl.core.files import write_text

# Bounds of the keys (checked when the config is built, before a run folder exists). Each is
# what the key's use can take, with room to spare; beyond it the value is a typo or a probe.
SEED_MAX = 2**32 - 1
"""numpy's legacy seeding (``np.random.seed``) takes seeds in [0, 2**32)."""
BATCH_MAX = 65536
"""Images per batch: beyond any accelerator's memory at the smallest useful image size."""
EPOCHS_MAX = 100_000
"""Epochs (and every-N-epochs periods, step sizes): a bound on counters kept in checkpoints."""
STEPS_MAX = 10**9
"""Iterations per epoch (``train.max_steps_per_epoch``)."""
LR_MAX = 10.0
"""Largest learning rate: Adam moves each weight by about lr per step, SGD by lr x gradient;
beyond 10 every step overshoots any weight's scale (paper 001: 1e-4)."""
WIDTH_MAX = 8.0
"""Largest channel multiplier: 8 x SegNet is ~2 G parameters, beyond any GPU's memory."""
SCALE_MAX = 8.0
"""Largest RandomScaleCrop zoom: the crop keeps 1/8 of each side."""
CROP_MAX = 65536
"""Largest ``dataset.augment.crop_size`` side, in pixels."""
RATIO_MAX = 1e6
"""Largest ``labels.ratios`` weight: the weights are normalised, so only their ratio counts."""


class Section(BaseModel):
    # allow_inf_nan=False: an lr of .inf or a NaN weight is a config error, not a diverged run
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # paths and names reach the OS, whose calls refuse a NUL with a ValueError
        if isinstance(value, str) and "\0" in value:
            raise ValueError("must not contain a NUL character")
        return value


class AugmentConfig(Section):
    scales: list[float] = Field(default=[1.0, 1.2, 1.5], min_length=1, max_length=64)
    """RandomScaleCrop zoom factors, each in [1, 8] (1.0 = no zoom); [1.0] disables
    scale-crop. Must be [1.0] (its default then) with ``scale_range`` or ``crop_size``."""
    flip: bool = False
    """Random horizontal flip (Cityscapes in the reference); normals' x is negated."""
    scale_range: tuple[float, float] | None = None
    """[low, high]: resize each image by a factor drawn uniformly from it, then take a
    ``crop_size`` crop, padding where the resized image is smaller (the ATRC / DiffusionMTL
    PASCAL-Context protocol: [0.5, 2.0]); each in [1/8, 8], low <= high. None = off."""
    crop_size: tuple[int, int] | None = None
    """[height, width] of that random crop, each in [1, 65536]; None = the image's own size."""
    cat_max_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    """With the random crop: redraw a crop (up to 10 times) while one class covers at least
    this share of the first class map's labelled pixels (0.75 in the ATRC / DiffusionMTL
    PASCAL code). It reads that map's label even where the regime hides it, as that code does.
    None = off."""
    photometric: bool = False
    """Photometric jitter of the image, each step with probability 1/2 (mmseg's
    PhotoMetricDistortion as the DiffusionMTL PASCAL code runs it): brightness +-32/255,
    contrast x[0.5, 1.5] (first or last), saturation x[0.5, 1.5], hue +-18 of 180."""

    @field_validator("scales")
    @classmethod
    def _zoom_range(cls, value: list[float]) -> list[float]:
        bad = [s for s in value if not 1.0 <= s <= SCALE_MAX]
        if bad:
            raise ValueError(f"each scale must lie in [1, {SCALE_MAX:g}] (a zoom that leaves a "
                             f"crop of the image); got {bad}")
        return value

    @field_validator("scale_range")
    @classmethod
    def _resize_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is None:
            return value
        low, high = value
        if not (1.0 / SCALE_MAX <= low <= high <= SCALE_MAX):
            raise ValueError(f"must be [low, high] with 1/{SCALE_MAX:g} <= low <= high <= "
                             f"{SCALE_MAX:g} (e.g. [0.5, 2.0]); got {list(value)}")
        return value

    @field_validator("crop_size")
    @classmethod
    def _crop_pixels(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not all(1 <= v <= CROP_MAX for v in value):
            raise ValueError(f"must be [height, width], each in [1, {CROP_MAX}]; got "
                             f"{list(value)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_zoom(cls, data: Any) -> Any:
        # the fixed-size crop replaces the discrete zoom: scales defaults to [1.0] with it
        if isinstance(data, dict) and "scales" not in data and (
                data.get("scale_range") is not None or data.get("crop_size") is not None):
            data = {**data, "scales": [1.0]}
        return data

    @model_validator(mode="after")
    def _not_both_zooms(self) -> AugmentConfig:
        if (self.scale_range is not None or self.crop_size is not None) and self.scales != [1.0]:
            raise ValueError("dataset.augment.scales: must be [1.0] with scale_range or "
                             f"crop_size (one zoom per pipeline); got {self.scales}")
        if self.cat_max_ratio is not None and self.crop_size is None:
            raise ValueError("dataset.augment.cat_max_ratio: needs crop_size (it redraws the "
                             "random crop)")
        return self

    @property
    def resize_crop(self) -> bool:
        """Whether the scale-range / fixed-size crop transform is on."""
        return self.scale_range is not None or self.crop_size is not None


class DatasetConfig(Section):
    name: str = "nyuv2"
    """Registered dataset (its on-disk layout); see ``mtpsl list datasets``."""
    root: str = "data/synthetic"
    """Folder holding the dataset's splits (``mtpsl data check --root`` validates it)."""
    tasks: list[str] | None = None
    """Subset of the dataset's tasks, in its order; None = all."""
    options: dict[str, Any] = {}
    """Dataset-specific keyword arguments, e.g. ``num_classes: 19`` for Cityscapes."""
    train_split: str = "train"
    """Split folder the model trains on."""
    eval_split: str = "val"
    """Split folder the reported metrics are computed on."""
    cache: bool = False
    """Keep decoded arrays in memory after the first epoch."""
    augment: AugmentConfig = AugmentConfig()
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Carve this fraction of the training images into a validation split used (only) to
    select a best epoch; the evaluation split never selects anything."""


class LabelsConfig(Section):
    regime: str = "onelabel"
    """full | onelabel | random | ratio, or another registered regime (``mtpsl list regimes``;
    checked with the other registered names by :func:`mtpsl.engine.build.check_names`)."""
    ratios: list[float] | None = Field(default=None, min_length=1, max_length=64)
    """Per-task weights for the 'ratio' regime, in task order (e.g. [9, 1]); each in
    [0, 1e6], not all 0."""
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    """Seed of the split; None uses the run seed."""
    file: str | None = None
    """Load the split from a file (our .json or a reference .pth) instead of drawing one."""

    @field_validator("ratios")
    @classmethod
    def _weights(cls, value: list[float] | None) -> list[float] | None:
        # the regime divides by their sum: it must be finite and positive
        if value is None:
            return value
        bad = [r for r in value if not 0.0 <= r <= RATIO_MAX]
        if bad:
            raise ValueError(f"each ratio must lie in [0, {RATIO_MAX:g}] (only the ratios "
                             f"count); got {bad}")
        if not any(value):
            raise ValueError("at least one ratio must be above 0 (all 0 labels nothing)")
        return value


class BackboneConfig(Section):
    """Encoder of the encoder + heads models (``resnet``, ``dense``; ignored by SegNet and
    MTAN); ``mtpsl list encoders`` shows the registered ones."""

    name: str = "resnet"
    """Registered encoder: ``resnet`` (torchvision, dilated) or ``timm`` (any timm model with
    ``features_only``)."""
    depth: Literal[18, 34, 50, 101, 152] = 50
    """ResNet depth of the ``resnet`` encoder."""
    arch: str | None = None
    """timm model name of the ``timm`` encoder (e.g. convnext_atto, resnet50, hrnet_w18)."""
    weights: str | None = None
    """Local checkpoint (torchvision / timm state dict, .safetensors for timm); None = random
    init. Never downloaded."""
    output_stride: Literal[8, 16, 32] = 8
    """8 or 16 = dilated last stages (DeepLab/PSP style); 32 = the plain network."""
    options: dict[str, Any] = {}
    """Further encoder keyword arguments (timm: ``timm.create_model`` kwargs such as
    out_indices or drop_path_rate)."""
    normalize: Literal["none", "imagenet"] = "none"
    """What the encoder does to its [0, 1] RGB input first: ``imagenet`` subtracts ImageNet's
    channel means and divides by their standard deviations, as ImageNet weights expect (the
    PASCAL partial-label presets set it); ``none`` feeds the image as it is (random init, and
    every run recorded before the key existed)."""


class ModelConfig(Section):
    name: str = "segnet"
    """Registered model; see ``mtpsl list models``."""
    width: float = Field(default=1.0, gt=0.0, le=WIDTH_MAX)
    """Channel multiplier (1.0 = the paper's SegNet; 0.25 for quick CPU runs)."""
    backbone: BackboneConfig = BackboneConfig()
    options: dict[str, Any] = {}
    """Model-specific keyword arguments (e.g. the head type), checked by the model builder."""


WeightingGradients = Literal["parameters", "representation", "gramian"]
"""What a gradient strategy differentiates (``method.weighting_gradients``)."""


class MethodConfig(Section):
    name: str = "sl"
    """How partial labels become losses; see ``mtpsl list methods``."""
    options: dict[str, Any] = {}
    """Method-specific options, validated by the method's own options model."""
    network: str | None = None
    """A registered model this method trains instead of ``model.name`` (built from the same
    ``model`` section: backbone, width, options), for methods that bring their own network
    (``diffusion_mtl``, ``hitts``); being part of the method, a comparison pairs such a
    method with the others of its grid like any method. None: ``model.name``."""
    weighting: str = "uniform"
    """How per-task losses are combined (see mtpsl.weighting.WEIGHTINGS)."""
    weighting_options: dict[str, Any] = {}
    """Strategy-specific options, validated by the strategy's own options model."""
    weighting_gradients: WeightingGradients | None = None
    """What a gradient strategy differentiates: the shared parameters (exact; the default),
    the shared representation the task heads read (LibMTL's ``rep_grad``, MGDA-UB's bound:
    one backward through the heads per task instead of through the whole network), or the
    shared parameters' Gram matrix by torchjd's autogram engine (exact, without K gradient
    copies; one process, every forward pass of the shared layers read by a task loss). None:
    the strategy's own default (``representation`` for ``mgda_ub``)."""


class OptimConfig(Section):
    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimiser of the model (a method's own networks may have their own, e.g. FiLM's)."""
    lr: float = Field(default=1e-4, gt=0.0, le=LR_MAX)
    """Learning rate (1e-4 with Adam in paper 001)."""
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    """L2 penalty of the optimiser (usual: 1e-4 to 5e-4). At most 1: SGD shrinks each weight
    by lr x weight_decay per step, which beyond 2 flips and grows it."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's betas, each in [0, 1)."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """SGD's momentum."""
    schedule: Literal["step", "poly"] = "step"
    """step: StepLR(step_size, gamma) per epoch; poly: lr * (1 - epoch/epochs) ** poly_power."""
    step_size: int = Field(default=100, gt=0, le=EPOCHS_MAX)
    """StepLR period in epochs."""
    gamma: float = Field(default=0.5, gt=0.0, le=1.0)
    """StepLR factor applied every ``step_size`` epochs."""
    poly_power: float = Field(default=0.9, gt=0.0, le=100.0)
    """Exponent of the poly schedule (beyond 100 the lr is ~0 after the first epoch)."""

    @field_validator("betas")
    @classmethod
    def _decay_rates(cls, value: tuple[float, float]) -> tuple[float, float]:
        # Adam divides by 1 - beta**t: a beta of 1 divides by zero, above 1 flips its sign
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each beta must lie in [0, 1); got {list(value)}")
        return value


class CallbackConfig(Section):
    class_path: str = Field(pattern=r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")
    """``package.module:Class``: a subclass of ``mtpsl.engine.callbacks.Callback``,
    importable where the run starts."""
    options: dict[str, Any] = {}
    """Keyword arguments of its constructor."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: object) -> object:
        # ``train.callbacks=[pkg.mod:Class]`` on the command line
        return {"class_path": value} if isinstance(value, str) else value


REQUIRED_WEIGHTS = (
    "model.backbone.weights is not set, and train.require_weights is true (this protocol "
    "starts the encoder from ImageNet): give a local checkpoint with "
    "model.backbone.weights=PATH (nothing is downloaded), or train.require_weights=false to "
    "start from random weights")
"""Why a run with ``train.require_weights`` and no encoder weights stops (checked by
:func:`mtpsl.engine.build.check_names` and the CLI's preflight)."""


class TrainConfig(Section):
    epochs: int = Field(default=200, gt=0, le=EPOCHS_MAX)
    """Training epochs (200 in paper 001)."""
    batch_size: int = Field(default=2, gt=0, le=BATCH_MAX)
    """Images per step *per process*: under ``torchrun`` with N processes a step sees
    N x batch_size images (torchrun's convention; the learning rate is not rescaled)."""
    eval_batch_size: int = Field(default=8, gt=0, le=BATCH_MAX)
    """Images per evaluation batch (does not change the metrics)."""
    eval_every: int = Field(default=10, gt=0, le=EPOCHS_MAX)
    """Evaluate every N epochs (and always after the last one)."""
    checkpoint_every: int = Field(default=10, gt=0, le=EPOCHS_MAX)
    """Write the checkpoint every N epochs (and always after the last one)."""
    accumulate: int = Field(default=1, gt=0, le=BATCH_MAX)
    """Micro-batches of ``batch_size`` per optimiser step: their gradients are summed with
    each loss divided by the group's size, which equals one step on the larger batch for
    weightings linear in the losses (the only ones allowed with it; BatchNorm still sees
    micro-batches). ``max_steps_per_epoch`` counts micro-batches."""
    clip_norm: float | None = Field(default=None, gt=0.0, le=1e6)
    """Clip the global L2 norm of all trained gradients to this before each step (after the
    fp16 unscale and the torchrun average); None = no clipping (a bound above 1e6 would
    never clip)."""
    require_weights: bool = False
    """Refuse to train (a ConfigError naming ``model.backbone.weights``, before any data is
    read) when a model with an encoder has no local weights: set by presets whose numbers
    depend on starting from ImageNet (the PASCAL-Context partial-label protocol)."""
    max_steps_per_epoch: int | None = Field(default=None, gt=0, le=STEPS_MAX)
    """Cap on iterations per epoch (smoke tests and equal-budget comparisons)."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes, 0..256 (0 = load in the training process); auto = 0 on
    the CPU (a worker would take a core from the compute threads), else up to 8 of the cores
    this process may use, one left for it (:func:`mtpsl.engine.speed.loader_workers`)."""
    threads: int | Literal["auto"] = "auto"
    """Intra-op CPU threads of torch, 1..4096; auto keeps torch's count (OMP_NUM_THREADS when
    set), lowered to the cores this process may use (its affinity and cgroup quota, shared
    with the other processes torchrun started on the node). Not part of the set-up."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    deterministic: bool = True
    """Deterministic kernels (bitwise-reproducible on CPU; may be slower on GPU)."""
    progress: bool = True
    """tqdm bars for the steps of each epoch when stderr is a terminal (the per-epoch line is
    printed either way)."""
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Autocast the forward pass and losses: bf16 (CUDA; also CPU), or fp16 with a dynamic
    GradScaler (only with weightings linear in the losses: uniform, dwa). Predictions and
    task activations are kept in fp32, so losses, normalisations and metrics stay fp32.
    auto = bf16 where the device computes it natively (a CUDA GPU of compute capability 8.0
    or more; a CPU whose oneDNN has bf16 instructions: AVX512-BF16, AMX, Arm BF16), else off.
    A run records the precision it resolved to (config.yaml, set-up), never "auto"."""
    channels_last: bool | Literal["auto"] = "auto"
    """NHWC memory format for the model, its inputs and the method's networks. auto = on
    the CPU (faster in fp32 and bf16 alike) and on CUDA with autocast or TF32 tensor cores
    (compute capability 8.0+); recorded resolved, like ``amp``."""
    compile: bool = False
    """``torch.compile`` the model's forward (in place: checkpoint keys are unchanged). The
    first steps are slow while it compiles; needs a C++ compiler on CPU."""
    fused_optimizer: bool = True
    """Fused Adam/SGD kernels when training on CUDA (ignored on CPU)."""
    sync_bn: bool = False
    """Under torchrun: BatchNorm statistics over the global batch instead of each process's
    share (torch's SyncBatchNorm on CUDA, an all-reduce BatchNorm on CPU/gloo)."""
    dist_timeout_s: float = Field(default=600.0, ge=1.0, le=604800.0)
    """Under torchrun: seconds a process waits in a collective (joining the group included)
    before it gives up on a peer that stopped or hung (error, exit status 69). The others
    wait there while rank 0 evaluates and writes the checkpoint: keep it above that. Not
    part of the set-up."""
    callbacks: list[CallbackConfig] = []
    """Callbacks of your own (``{class_path: pkg.mod:Class, options: {...}}`` or just
    ``pkg.mod:Class``), run after the built-in hooks and before the run's files are written;
    see docs/extending.md. Part of the set-up when given."""

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare ``off`` (``train.amp=off``) as the boolean false.
        return "off" if value is False else value

    @field_validator("num_workers", "threads", mode="before")
    @classmethod
    def _auto_or_count(cls, value: object, info: ValidationInfo) -> object:
        # each worker is a process, each thread an OS thread: beyond these, none starts
        least, most = (0, 256) if info.field_name == "num_workers" else (1, 4096)
        if value == "auto" or (type(value) is int and least <= value <= most):
            return value
        raise ValueError(f"must be auto or an integer in [{least}, {most}]")

    @field_validator("channels_last", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: object) -> object:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError("must be auto, true or false")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or value.startswith("cuda:"):
            return value
        raise ValueError(f"must be one of auto, cpu, cuda, cuda:N, mps; got {value!r}")


class MethodVariant(Section):
    method: str
    """A registered method name."""
    options: dict[str, Any] = {}
    network: str | None = None
    """Its ``method.network`` (the model it trains instead of ``model.name``)."""
    weighting: str | None = None
    """Loss-weighting strategy of this variant; None keeps ``method.weighting``."""
    weighting_options: dict[str, Any] | None = None
    """Its options; None keeps the base options if the strategy is the base one, else {}."""
    weighting_gradients: WeightingGradients | None = None
    """Its ``method.weighting_gradients``; None keeps the base one if the strategy is the
    base one, else the strategy's default."""


class LauncherConfig(Section):
    """Where a ``compare`` grid's cells train (``compare.launcher``); no part of any set-up."""

    name: Literal["local", "submitit"] = "local"
    """local: on this machine, ``jobs`` cells at once; submitit: one cluster job per cell
    through submitit (``pip install 'mtpsl[cluster]'``), requeued when preempted."""
    jobs: int = Field(default=1, ge=1, le=1024)
    """local: cells trained at once, each in its own process on its own GPU(s) (or its share
    of the CPU threads); 1 = one after another in the compare process itself."""
    cluster: Literal["auto", "slurm", "local"] = "auto"
    """submitit: its executor; local = jobs as processes of this machine (to try a set-up);
    auto = slurm where sbatch is found, else local."""
    partition: str | None = None
    """submitit: SLURM partition (None: the cluster's default)."""
    time_min: int = Field(default=1440, ge=1, le=527_040)
    """submitit: time limit of each job, minutes; a cell stopped by it is requeued and
    continues from its mid-epoch checkpoint (at most ``max_timeouts`` times)."""
    max_timeouts: int = Field(default=3, ge=0, le=1000)
    """submitit: requeues after the time limit (preemptions are always requeued)."""
    gpus_per_cell: int = Field(default=1, ge=0, le=1024)
    """GPUs of each cell (0: CPU); over 1, a cell is one data-parallel process per GPU, as
    torchrun starts them."""
    cpus_per_cell: int | None = Field(default=None, ge=1, le=4096)
    """CPU cores (torch threads) of each cell; None: local = this machine's cores over
    ``jobs``, submitit = the cluster's default."""
    mem_gb: float | None = Field(default=None, gt=0, le=1e6)
    """submitit: memory of each job, GB (None: the cluster's default)."""
    array_parallelism: int | None = Field(default=None, ge=1, le=10**6)
    """submitit on SLURM: most cells of one submission running at once (a job array)."""
    setup: list[str] = []
    """submitit: shell lines each job runs first, e.g. ``module load cuda``."""
    slurm: dict[str, Any] = {}
    """submitit on SLURM: more sbatch options, e.g. ``{account: proj, qos: high}``."""


class CompareConfig(Section):
    methods: list[str] = ["stl", "sl"]
    """Method names or names of ``variants``."""
    regimes: list[str] = ["onelabel"]
    """Regime names; ``ratio:9:1`` is the ratio regime with those weights."""
    seeds: list[int] = Field(default=[0], min_length=1, max_length=1000)
    """Seeds of each cell (each in [0, 2**32 - 1]): three or more for a table that can draw
    a conclusion."""
    baseline: str = "stl"
    """Method (or variant) whose runs of the same set-up and seed are the reference of the
    paired Delta_m."""
    variants: dict[str, MethodVariant] = {}
    """Named method + options, e.g. ``xtc_nocond: {method: xtc, options: {conditioned:
    false}}``. A variant named like a method sets that method's options in the grid."""
    extra_cells: list[str] = []
    """Cells outside the grid as ``method@regime``, e.g. ``sl@full`` (paper tables' "SL
    (full labels)" row)."""
    delta_metrics: list[str] | None = None
    """``task/metric`` keys that Delta_m (and the tables' columns) use, e.g. ``[semantic/miou,
    depth/rmse]`` as in SemiMTL; None = each task's primary metric."""
    contrasts: list[str] = []
    """More paired comparisons than against the baseline, as ``a:b`` (method or variant
    names): e.g. ``[xtc:sl]`` adds a verdict on XTC's Delta_m against SL, seed by seed."""
    weightings: list[str] = []
    """Loss weightings to sweep: every method of the grid but the baseline runs once per
    weighting, in a cell named ``method+weighting`` (e.g. ``sl+pcgrad``); ``all`` = every
    registered one; empty = each method's own."""
    launcher: LauncherConfig = LauncherConfig()
    """Where the cells train: this machine (``--jobs N`` at once) or a cluster (submitit)."""

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 0 <= s <= SEED_MAX]
        if bad:
            raise ValueError(f"each seed must lie in [0, {SEED_MAX}]; got {bad}")
        return value

    @field_validator("contrasts")
    @classmethod
    def _pairs(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if len(v.split(":")) != 2 or not all(v.split(":"))]
        if bad:
            raise ValueError(f"{bad} must each look like a:b (e.g. xtc:sl)")
        return value


LogBackend = Literal["tensorboard", "csv", "wandb", "mlflow"]
"""A logging backend (``log.backends``); W&B and MLflow need their extras installed."""


class LogConfig(Section):
    """Where a run's hyperparameters and per-epoch metrics are logged, beside its own
    ``metrics.jsonl`` (no part of the set-up; fixed for a run's whole life, resumes included)."""

    backends: list[LogBackend] = ["tensorboard", "csv"]
    """Any of tensorboard (RUN/tensorboard), csv (RUN/metrics.csv), wandb (``pip install
    'mtpsl[wandb]'``; WANDB_MODE=offline keeps it on this machine) and mlflow (``pip install
    'mtpsl[mlflow]'``); a resumed run continues its W&B / MLflow run."""
    project: str = "mtpsl"
    """W&B project and MLflow experiment of the run (its name is the config's ``name``)."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; None: MLFLOW_TRACKING_URI, else a file store in RUN/mlruns."""

    @field_validator("backends")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"names a backend twice: {value}")
        return value


class Config(Section):
    name: str = "run"
    """Run name: the run folder is ``output_dir/name`` (made unique) unless --run-dir."""
    label: str | None = None
    """How tables name this run; ``compare`` sets the grid cell's method or variant name.
    None = ``method.name``."""
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    """Seed of weights, data order and (unless labels.seed) the label split."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    dataset: DatasetConfig = DatasetConfig()
    labels: LabelsConfig = LabelsConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    compare: CompareConfig = CompareConfig()
    log: LogConfig = LogConfig()

    @field_validator("name")
    @classmethod
    def _inside_output_dir(cls, value: str) -> str:
        # the run folder is output_dir/name: a name that leaves output_dir writes elsewhere
        parts = re.split(r"[\\/]", value)
        if (not value.strip() or value[0] in "/\\" or re.match(r"[A-Za-z]:", value)
                or ".." in parts or all(p in ("", ".") for p in parts)):
            raise ValueError("must name a folder inside output_dir: relative, without '..' "
                             "(e.g. my-run or study/my-run)")
        return value

    @model_validator(mode="after")
    def _finite_options(self) -> Config:
        """Free-form option mappings (method, weighting, model, dataset) hold no NaN/inf."""
        for section, key in (("dataset", "options"), ("model", "options"),
                             ("method", "options"), ("method", "weighting_options")):
            where = _nonfinite_path(getattr(getattr(self, section), key), f"{section}.{key}")
            if where:
                raise ValueError(f"{where}: must be a finite number (NaN and inf are refused)")
        return self


def _nonfinite_path(value: Any, where: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        items = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for path, v in items if (found := _nonfinite_path(v, path))), None)


def preset_names() -> list[str]:
    names = (p.name for p in resources.files("mtpsl.presets").iterdir())
    return sorted(n.removesuffix(".yaml") for n in names if n.endswith(".yaml"))


MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (the presets are under 4 KiB): a device such as /dev/zero or a
huge file is refused before it fills the memory."""
MAX_YAML_VALUES = 100_000
"""Most values (scalars, lists, mappings) a YAML document may expand to, its aliases
followed: a config has a few hundred, an alias bomb billions."""


def _read_yaml(source: str) -> dict:
    path = Path(source)
    if not path.exists():
        if source in preset_names():
            path = Path(str(resources.files("mtpsl.presets") / f"{source}.yaml"))
        else:
            raise ConfigError(
                f"config {source} is neither a file nor a preset; presets: {preset_names()}"
            )
    try:
        data = parse_yaml(_read_text(path), f"config {path}") or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config {path} is not UTF-8 text: {err.reason} at byte "
                          f"{err.start}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    return data


def _read_text(path: Path) -> str:
    """At most :data:`MAX_CONFIG_BYTES` of a regular file or a pipe (``--config <(...)``)."""
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise ConfigError(f"config {path} is a folder, not a YAML file")
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise ConfigError(f"config {path} is not a regular file (a device or socket)")
    with open(path, "rb") as fp:
        raw = fp.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: "
                          "not a config file")
    return raw.decode("utf-8")


def parse_yaml(text: str, what: str) -> Any:
    """Safe-load YAML whose expansion is bounded; failures are one ConfigError naming ``what``.

    PyYAML shares the object of an anchor among its aliases, so loading a bomb is quick but
    everything that walks the result later (validation, the option checks, saving) expands
    it: the composed node graph is sized first, aliases followed, and refused beyond
    :data:`MAX_YAML_VALUES`, wherever in the document (or an override value) the bomb sits.
    """
    try:
        return _bounded_load(text, what)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {err}") from None
    except RecursionError:  # pathological nesting ("[[[[..."): the parser recurses per level
        raise ConfigError(f"{what} is nested too deeply to be a config") from None


def _bounded_load(text: str, what: str) -> Any:
    loader = yaml.SafeLoader(text)  # what ``yaml.safe_load`` does, with the size check
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set(), what)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int], what: str) -> int:
    """Values under ``node`` with every alias expanded (memoised per node: linear time)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ConfigError(f"{what}: a YAML alias refers to a node that contains it (an "
                          "endless structure)")
    open_.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    size = 1 + sum(_expanded_size(child, sizes, open_, what) for child in children)
    open_.discard(key)
    if size > MAX_YAML_VALUES:
        raise ConfigError(f"{what} expands to more than {MAX_YAML_VALUES:,} values (YAML "
                          "aliases repeating anchors): refused as an alias bomb")
    sizes[key] = size
    return size


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (numbers, lists...)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} must look like key.subkey=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    node[leaf] = parse_yaml(raw, f"override {assignment!r}: the value") if raw else None


def trained_model(config: Config) -> tuple[str, str]:
    """The registered model a run trains and the key that names it: ``method.network`` where
    the method brings its own network, else ``model.name``."""
    if config.method.network is not None:
        return config.method.network, "method.network"
    return config.model.name, "model.name"


def build_config(data: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}:\n" + _explain(err)) from None


def load_config(source: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML file or preset (or the defaults), apply overrides, validate."""
    data = _read_yaml(source) if source else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return build_config(data, source or "config")


def save_config(config: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(config.model_dump(), sort_keys=False))


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _section_at(e["loc"][:-1])
            allowed = ", ".join(section.model_fields) if section else "?"
            lines.append(f"  {loc}: unknown key; allowed: {allowed}")
        elif not loc:  # a whole-config check: its message names the key itself
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model

