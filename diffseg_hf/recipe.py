"""Recipes: YAML files with sections, loaded into frozen, validated dataclasses.

A recipe may start from another with `base: NAME` (deep merge), so ablation variants state only their one
change. `--set section.key=value` overrides are parsed as YAML scalars and validated like file values.
Unknown keys and wrong types are `RecipeError`s naming the key path. Derived values (model channels from
the data, global batch) are properties, never written in a file.

Names (data sources, block types, schedules, samplers, ...) come from their registries: a field marked
`field(metadata={"registry": NAME})` is checked against the registry `diffseg_hf.registries.REGISTRIES[NAME]`
when the recipe loads, with a "did you mean". Registries live in higher layers than the recipe; this module
reaches them only through `diffseg_hf.registries`, which imports a registry on its first lookup.

A recipe name (`--recipe NAME`, `base: NAME`) is looked up as `NAME.yaml` in the folders of `$DIFFSEG_RECIPE_PATH`
(a user's own recipe library; folders separated by `:`, searched in order) before the shipped recipes, so a
folder there can also shadow a shipped recipe under its own name; `list_recipes` lists both. A path to a `.yaml`
file always works.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from . import registries
from .errors import RecipeError


@dataclass(frozen=True)
class DataConfig:
    # a key of diffseg_hf.data.IMAGE_SOURCES, or "imagefolder:PATH" / "hub:ID"
    source: str = field(default="fashion-mnist", metadata={"registry": "data source"})
    path: str | None = None  # local folder overriding the source's default location
    hub_id: str | None = None  # Hub dataset id for sources that can stream from the Hub (mnist, voc)
    split: str = "train"
    resolution: int = 32
    channels: int = 1
    hflip: bool = False
    streaming: bool = False
    max_images: int | None = None  # use only the first N images
    shuffle_buffer: int = 1000  # streaming only


def _block_option_defaults() -> dict[str, Any]:
    """model.<option> -> default for the options each block type declares beside itself (`BlockType.options`
    in diffseg_hf.remote.diffseg_unet.RESIDUAL_BLOCKS)."""
    return {key: default for block in registries.lookup("block").values() for key, default in block.options.items()}


@dataclass(frozen=True)
class ModelConfig:
    implementation: Literal["diffseg", "diffusers"] = "diffseg"  # diffusers: the stock UNet2DModel (block resnet)
    block: str = "resnet"  # a key of the "block" registry (diffseg_hf.models.RESIDUAL_BLOCKS), checked below
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sizes that get self-attention
    mid_attention: bool = True
    attention_head_dim: int | None = 8
    norm_num_groups: int = 8
    dropout: float = 0.0
    # the block types' own options (model.convnext_expansion, ...), written flat in the section like the keys
    # above; declared with their defaults beside each block, so a new option needs no line here. Every declared
    # option is filled in (defaults resolved) and reads like a field: recipe.model.convnext_expansion.
    block_options: dict[str, Any] = field(default_factory=dict, hash=False, metadata={"flat": _block_option_defaults})

    def __post_init__(self):
        blocks = registries.lookup("block")
        if self.block not in blocks:
            close = difflib.get_close_matches(self.block, list(blocks), n=1)
            raise RecipeError(f"unknown block type {self.block!r} (model.block); choose from {', '.join(blocks)}"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        defaults = _block_option_defaults()
        unknown = sorted(set(self.block_options) - set(defaults))
        if unknown:
            raise RecipeError(f"unknown block option model.{unknown[0]}; the block types declare "
                              f"{', '.join(defaults)}")
        object.__setattr__(self, "block_options", {k: self.block_options.get(k, d) for k, d in defaults.items()})
        if self.implementation == "diffusers" and (self.block != "resnet" or not self.mid_attention):
            raise RecipeError("model.implementation=diffusers builds the stock UNet2DModel: it needs "
                              "model.block=resnet and model.mid_attention=true")

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields: the block options
        options = self.__dict__.get("block_options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    schedule: str = field(default="linear", metadata={"registry": "noise schedule"})  # diffseg_hf.schedule.SCHEDULES
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    clip_sample: bool = True


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # per process
    lr: float = 2e-4
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_minutes: float | None = None  # wall-clock budget: stop (and save) once the training loop has run this long
    # "minutes": the LR schedule ends when max_minutes does. After the first CALIBRATION_STEPS steps the run
    # measures its seconds per step and sets its horizon to the steps that fit the rest of the budget (at most
    # max_steps), so a slow machine gets a complete warm-up + decay instead of a schedule cut off half way.
    # Every REFIT_EVERY steps after that (until 90% of the horizon) it re-fits the horizon from its mean seconds
    # per step so far, sample grids and checkpoints included, when that moves it by more than 1%.
    lr_horizon: Literal["steps", "minutes"] = "steps"
    loss_weighting: Literal["none", "min-snr"] = "none"  # min-snr: Hang et al. 2023, weight min(SNR, gamma) / SNR
    snr_gamma: float = 5.0
    # a feature backbone: draw the training timesteps of a max_timestep_share of the images from [0, max_timestep)
    # instead of the whole range (None: uniform over every timestep). The readout reads small t (segment.timesteps);
    # share 1 trains no larger t, so the model cannot sample from noise (BENCHMARKS.md, "Training timesteps")
    max_timestep: int | None = None
    max_timestep_share: float = 1.0
    # None: take the launcher's setting. "auto": bf16 on a GPU that has it (else fp16); on CPU, time a few steps in
    # fp32 and under bf16 autocast first and keep the faster (bf16 was about 1.6x faster on the CPUs we benchmarked and
    # 15-17x slower on an AVX2-only CPU: BENCHMARKS.md); a resume keeps the run's choice
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] | None = None
    # NHWC weights and batches; "auto": time a few steps of both layouts on this machine first and keep the faster
    # (the winner depends on the CPU's oneDNN kernels: BENCHMARKS.md, issue #16); a resume keeps the run's choice
    channels_last: bool | Literal["auto"] = False
    fused_optimizer: bool = False  # torch's fused AdamW (one kernel for every parameter)
    # torch.compile the UNet (accelerate's dynamo backend "inductor"; a CPU needs a C++ compiler). The first step
    # compiles, and train.max_minutes counts it: on the 2-core AMD EPYC fashion-seg's path (bf16, NCHW) compiled in
    # 56 s and then ran no faster (607 vs 594 ms/step), so no recipe sets it; it is for GPUs (bench/gpu.py)
    compile: bool = False
    ema_decay: float = 0.9999  # diffusers EMAModel max decay
    ema_warmup: bool = True  # EMAModel warm-up: decay = 1 - (1 + step / inv_gamma) ** -power
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 2
    sample_every: int = 0  # 0: only at the end
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.lr_horizon == "minutes" and self.max_minutes is None:
            raise RecipeError("train.lr_horizon=minutes needs a budget: set train.max_minutes (or use "
                              "train.lr_horizon=steps)")
        if self.max_timestep is not None and self.max_timestep < 1:
            raise RecipeError(f"train.max_timestep={self.max_timestep} must be >= 1 (or null: every timestep)")
        if not 0.0 < self.max_timestep_share <= 1.0:
            raise RecipeError(f"train.max_timestep_share={self.max_timestep_share} must be in (0, 1]")


@dataclass(frozen=True)
class SampleConfig:
    scheduler: str = field(default="ddim", metadata={"registry": "sampler"})  # diffseg_hf.schedule.SAMPLERS
    steps: int = 50
    num_images: int = 64
    batch_size: int = 64
    seed: int = 0


# The readout settings that `segment.preset` fills in when a recipe leaves them unset. "reference" is the
# protocol of Baranchuk et al. 2021 (the defaults of FeatureProtocol and ReadoutConfig, tested equal); "tuned"
# is the best setting measured on fashion-seg's DEV split (train-split canvases, never the test split; BENCHMARKS.md,
# "Readout levers"), with the features averaged over 4 noise draws, which moved every dev split we measured it on
# the same way (+0.3 to +0.8 per seed on two generators; BENCHMARKS.md, "Noise draws"); `diffseg segment tune`
# re-chooses timesteps, blocks and head on a user's labelled images.
SEGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "reference": {"blocks": None, "timesteps": (50, 150, 250), "noise": "fixed", "num_noise_draws": 1,
                  "flip": False, "head": "mlp-ensemble", "vote": "hard", "standardize": False},
    "tuned": {"blocks": None, "timesteps": (10, 50), "noise": "mean", "num_noise_draws": 4,
              "flip": False, "head": "conv", "vote": "soft", "standardize": True},
}
_PRESET_KEYS = tuple(SEGMENT_PRESETS["reference"])


@dataclass(frozen=True)
class SegmentConfig:
    """Label-efficient segmentation on the DDPM's decoder features.

    The feature protocol (`protocol`) and the readout's fit options (`readout`) are built from these keys; the
    keys in SEGMENT_PRESETS that a recipe leaves unset come from `preset`."""

    model: str | None = None  # default DDPM for `segment fit` (a folder or Hub id); --model overrides it
    dataset: str = field(default="fashion-seg", metadata={"registry": "segmentation dataset"})
    path: str | None = None  # local folder (VOCdevkit for voc; Fashion-MNIST IDX folder for fashion-seg)
    hub_id: str | None = None  # Hub dataset id (voc, hub)
    image_column: str = "image"  # hub: the dataset's image and mask columns
    mask_column: str = "mask"
    streaming: bool = False  # hub: stream the rows instead of downloading the split
    train_split: str = "train"
    test_split: str = "test"
    # the first N labelled images (folder: in name order); None: all of them. fashion-seg draws N canvases from
    # data_seed at once, so another N holds other canvases, not a prefix of them
    num_labeled: int | None = 20
    num_test: int | None = 500  # held-out images for `segment eval`; None: the whole test split
    data_seed: int = 0  # which canvases are drawn (fashion-seg)
    preset: str = field(default="tuned", metadata={"registry": "segment preset"})  # SEGMENT_PRESETS: fills unset keys
    # feature protocol (diffseg_hf.remote.pipeline_diffseg_segmentation.FeatureProtocol)
    blocks: tuple[str, ...] | None = None  # UNet module names; None: every up block
    timesteps: tuple[int, ...] | None = None
    noise: str | None = field(default=None, metadata={"registry": "noise protocol"})
    num_noise_draws: int | None = None
    noise_seed: int = 0
    flip: bool | None = None  # test-time (and fit-time) mirroring: both views vote
    # readout head (diffseg_hf.readout.ReadoutConfig)
    head: str | None = field(default=None, metadata={"registry": "readout head"})  # diffseg_hf.readout.READOUT_HEADS
    vote: str | None = field(default=None, metadata={"registry": "vote"})  # remote.pixel_ensemble.VOTES
    standardize: bool | None = None  # per-channel feature standardisation (statistics of the labelled pixels)
    num_members: int = 10
    batch_size: int = 64  # pixels per MLP step
    lr: float = 1e-3
    max_epochs: int = 100
    patience: int = 50  # batches without a new best loss before a member stops (after min_epochs)
    min_epochs: int = 4
    memory_mb: float = 512.0  # cap on stored features (float16): the MLPs' pixel store or the conv head's maps
    conv_width: int = 64
    conv_members: int = 1  # conv heads with different seeds, soft-voted
    conv_dilations: tuple[int, ...] = (1, 2, 4)  # the conv head's mixers: receptive field 1 + 2 * sum = 15 px
    conv_steps: int = 600
    conv_lr: float = 2e-3
    conv_batch_size: int = 8
    conv_dropout: float = 0.5  # channel dropout on the head's input features; was 0.1 (BENCHMARKS.md)
    conv_max_shift: int = 0
    dice_weight: float = 1.0
    # self-training (conv head): pseudo-labels on unlabelled images (diffseg_hf.readout.self_train_conv_head)
    self_train_rounds: int = 0
    pseudo_threshold: float = 0.7
    pseudo_share: float = 0.5
    self_train_steps: int = 1500
    # the unlabelled images: an image source as data.source takes (null: the recipe's data section, i.e. the
    # DDPM's own training images), its first num_unlabeled images; their masks, if any, are never read
    unlabeled: str | None = field(default=None, metadata={"registry": "data source"})
    num_unlabeled: int = 0
    seed: int = 0  # classifier initialisation and shuffling
    # supervised baseline (a U-Net from scratch on the same labelled images)
    baseline_steps: int = 1000  # tuned on fashion-seg's dev split: 1000 > 2000 > 4000 steps at 20 labels
    baseline_batch_size: int = 8
    baseline_lr: float = 2e-3
    baseline_max_shift: int = 2  # random translations of up to this many pixels (with the flips it always gets)
    baseline_members: int = 1  # U-Nets with seeds seed * K + k, soft-voted (give it what conv_members gives the head)
    # soft Dice added to its cross-entropy, as the conv head's dice_weight; fashion-seg dev split (20 labels, 3 seeds):
    # 19.7 mIoU at 1000 steps against 18.6 without (2000 steps: 19.6 / 19.0; 500: 17.3 / 17.5)
    baseline_dice_weight: float = 1.0
    baseline_dropout: float = 0.0  # channel dropout before the U-Net's head (the conv head's conv_dropout counterpart)

    def __post_init__(self):
        preset = SEGMENT_PRESETS[self.preset]
        for key in _PRESET_KEYS:
            if getattr(self, key) is None and key != "blocks":
                object.__setattr__(self, key, preset[key])
        try:
            self.protocol  # noqa: B018 - validate the feature protocol at load time
        except ValueError as e:
            raise RecipeError(f"segment: {e}") from None
        if self.baseline_members < 1:
            raise RecipeError(f"segment.baseline_members={self.baseline_members}: need >= 1 supervised U-Nets")
        if self.baseline_dice_weight < 0:
            raise RecipeError(f"segment.baseline_dice_weight={self.baseline_dice_weight}: need >= 0 (0: cross-entropy "
                              "only)")
        if not 0 <= self.baseline_dropout < 1:
            raise RecipeError(f"segment.baseline_dropout={self.baseline_dropout}: need a probability in [0, 1)")

    @property
    def protocol(self):
        """The `FeatureProtocol` these keys describe (remote/ is the bottom layer: self-contained, torch only)."""
        from .remote.pipeline_diffseg_segmentation import FeatureProtocol

        return FeatureProtocol(blocks=self.blocks, timesteps=self.timesteps, noise=self.noise,
                               num_noise_draws=self.num_noise_draws, noise_seed=self.noise_seed, flip=self.flip)

    def readout_options(self) -> dict[str, Any]:
        """The keys of `diffseg_hf.readout.ReadoutConfig` (head and fit options), as a dict."""
        names = ("head", "vote", "standardize", "seed", "num_members", "batch_size", "lr", "max_epochs", "patience",
                 "min_epochs", "memory_mb", "conv_width", "conv_members", "conv_dilations", "conv_steps", "conv_lr",
                 "conv_batch_size", "conv_dropout", "conv_max_shift", "dice_weight", "self_train_rounds",
                 "pseudo_threshold", "pseudo_share", "self_train_steps")
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class Recipe:
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    segment: SegmentConfig | None = None  # segmentation recipes only
    name: str = "custom"  # the file's stem unless the file says otherwise

    def __post_init__(self) -> None:
        top, steps = self.train.max_timestep, self.scheduler.num_train_timesteps
        if top is not None and top > steps:
            raise RecipeError(f"train.max_timestep={top} exceeds scheduler.num_train_timesteps={steps}; lower it "
                              "or set it to null")
        if self.segment is not None and top is not None and self.train.max_timestep_share >= 1.0:
            late = [t for t in self.segment.timesteps if t >= top]
            if late:
                raise RecipeError(f"segment.timesteps {late} are >= train.max_timestep={top}, where a DDPM trained "
                                  "with train.max_timestep_share=1 never learned; read smaller timesteps or raise "
                                  "train.max_timestep")

    @property
    def can_sample(self) -> bool:
        """False for a feature backbone that never trains the noisiest timesteps (train.max_timestep below
        scheduler.num_train_timesteps with train.max_timestep_share=1): it cannot denoise from pure noise."""
        top, share = self.train.max_timestep, self.train.max_timestep_share
        return top is None or share < 1.0 or top >= self.scheduler.num_train_timesteps

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step on one process (multiply by the process count for the global batch)."""
        return self.train.batch_size * self.train.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------- loading

RECIPE_PATH_ENV = "DIFFSEG_RECIPE_PATH"


def _recipe_dir() -> Path:
    return Path(str(resources.files("diffseg_hf.recipes")))


def recipe_dirs() -> list[Path]:
    """The folders searched for `NAME.yaml`, in order: those of $DIFFSEG_RECIPE_PATH, then the shipped recipes."""
    folders = []
    for entry in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep):
        if not entry.strip():
            continue
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise RecipeError(f"{RECIPE_PATH_ENV} names {entry}, which is not a folder; list folders of NAME.yaml "
                              f"recipes separated by '{os.pathsep}', or unset {RECIPE_PATH_ENV}")
        folders.append(folder)
    return folders + [_recipe_dir()]


def _find_recipe(name: str) -> Path | None:
    return next((p for p in (folder / f"{name}.yaml" for folder in recipe_dirs()) if p.is_file()), None)


def list_recipes() -> dict[str, str]:
    """Recipe name -> one-line description, sorted by name: the shipped recipes and those of $DIFFSEG_RECIPE_PATH
    (where both have a name, the one found first, as `load_recipe` would)."""
    files: dict[str, Path] = {}
    for folder in recipe_dirs():
        for file in sorted(folder.glob("*.yaml")):
            files.setdefault(file.stem, file)
    out = {}
    for name, file in sorted(files.items()):
        raw = _read_yaml(file)
        out[name] = str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""
    return out


def load_recipe(name_or_path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Load a recipe by name ($DIFFSEG_RECIPE_PATH, then the shipped ones) or a YAML file by path, apply
    `section.key=value` overrides, validate."""
    raw, name = _resolve(str(name_or_path), seen=())
    for item in overrides:
        _apply_override(raw, item)
    raw.setdefault("name", name)
    return _build(Recipe, raw, "")


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    return _build(Recipe, raw, "")


def _resolve(name_or_path: str, seen: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {name_or_path} does not exist")
        name = path.stem
    else:
        path = _find_recipe(name_or_path)
        if path is None:
            known = ", ".join(list_recipes())
            raise RecipeError(f"unknown recipe {name_or_path!r}; choose from {known} or pass a path to a .yaml file")
        name = name_or_path
    if name in seen:
        raise RecipeError(f"recipe {name}: circular `base` chain {' -> '.join(seen + (name,))}")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(f"recipe {name}: base: expected a recipe name, got {base!r}")
        if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute():
            base = str(path.parent / base)  # a base file is found beside the recipe that names it
        parent, _ = _resolve(base, seen + (name,))
        raw = _merge(parent, raw)
    return raw, name


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=2e-4")
    key_path, text = item.split("=", 1)
    keys = key_path.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {item!r}: {key} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        node[keys[-1]] = text


# ------------------------------------------------------------------------------------------- validation

def _build(cls: type, raw: Any, where: str) -> Any:
    """A section dataclass from its mapping. A field with metadata "registry" has its value(s) checked against
    that registry; a field with metadata "flat" (a function -> {key: default}) collects those keys, written
    flat in the section, into one dict (typed like their defaults)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if "flat" not in f.metadata}
    flat = next((f for f in dataclasses.fields(cls) if "flat" in f.metadata), None)
    flat_defaults = flat.metadata["flat"]() if flat else {}
    names = list(fields) + list(flat_defaults)
    values, flat_values = {}, {}
    for key, value in raw.items():
        path = f"{where}{key}"
        if key in flat_defaults:
            flat_values[key] = _coerce(type(flat_defaults[key]), value, path)
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise RecipeError(f"unknown key {path}{hint}")
        values[key] = _coerce(hints[key], value, path)
        if "registry" in fields[key].metadata:
            _check_names(fields[key].metadata["registry"], values[key], path)
    if flat is not None:
        values[flat.name] = flat_values
    return cls(**values)


def _check_names(registry: str, value: Any, path: str) -> None:
    """A name (or each name of a list) is a key of the registry; None (an unset optional) passes."""
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            registries.check(registry, item, f"{path}[{i}]")
    elif value is not None:
        registries.check(registry, value, path)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{path}: expected {_choices(args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            hint = ('; YAML reads an unquoted no as false: write "no"' if value is False and "no" in args else "")
            raise RecipeError(f"{path}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list of {_name(args[0])}, got {value!r}")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported recipe field type {tp!r} at {path}")


def _choices(args: tuple) -> str:
    """The values a union field takes, as a recipe writes them: "true, false or auto"."""
    words = [w for a in args if a is not type(None) for w in (
        ("true", "false") if a is bool else tuple(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal
        else (_name(a),))]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _plain(value: Any) -> Any:
    """Sections -> nested dicts of YAML values; a "flat" field's keys go into its section."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            item = _plain(getattr(value, f.name))
            out.update(item) if "flat" in f.metadata else out.update({f.name: item})
        return out
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
