import pytest

from conftest import TINY_MODEL
from diffseg_hf.build import build_scheduler, build_unet
from diffseg_hf.errors import RecipeError
from diffseg_hf.recipe import list_recipes, load_recipe

ABLATION = ["mnist-baseline", "mnist-adagn", "mnist-convnext", "mnist-cosine", "mnist-noattn"]


def test_shipped_recipes_listed_with_descriptions():
    recipes = list_recipes()
    for name in ABLATION + ["voc-baseline", "fashion-cpu"]:
        assert name in recipes and recipes[name], name


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_recipe_loads_and_builds_its_model(name):
    recipe = load_recipe(name, TINY_MODEL)
    unet, scheduler = build_unet(recipe), build_scheduler(recipe)
    assert unet.config.sample_size == recipe.data.resolution
    assert unet.config.in_channels == recipe.data.channels == unet.config.out_channels
    assert scheduler.config.num_train_timesteps == recipe.scheduler.num_train_timesteps
    full = build_unet(load_recipe(name))  # the real size builds too
    assert full.config.block_out_channels == load_recipe(name).model.block_out_channels


def _diff(a, b, path=""):
    out = set()
    for key in a.keys() | b.keys():
        if isinstance(a.get(key), dict):
            out |= _diff(a[key], b[key], f"{path}{key}.")
        elif a.get(key) != b.get(key):
            out.add(f"{path}{key}")
    return out


def test_ablation_variants_differ_from_baseline_only_in_their_change():
    base = load_recipe("mnist-baseline").to_dict()
    expected = {
        "mnist-adagn": {"model.block"},
        # + its fastest path: the layout and the fused optimizer change no maths (tests/test_training.py)
        "mnist-convnext": {"model.block", "train.channels_last", "train.fused_optimizer"},
        "mnist-cosine": {"scheduler.schedule"},
        "mnist-noattn": {"model.attention_resolutions", "model.mid_attention"},
    }
    for name, changed in expected.items():
        assert _diff(base, load_recipe(name).to_dict()) - {"name", "description"} == changed, name
    for name in ABLATION:
        r = load_recipe(name)
        assert (r.data.resolution, r.data.channels, r.scheduler.num_train_timesteps) == (32, 1, 1000)


def test_overrides_are_typed_and_validated():
    r = load_recipe("fashion-cpu", ["train.lr=2e-4", "model.block=convnext", "model.block_out_channels=[8, 16]",
                                    "train.mixed_precision=bf16", "data.max_images=null"])
    assert r.train.lr == 2e-4 and isinstance(r.train.lr, float)
    assert r.model.block == "convnext" and r.model.block_out_channels == (8, 16)
    assert r.train.mixed_precision == "bf16" and r.data.max_images is None


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown key train\.lrr; did you mean train\.lr\?"),
    ("nosection.x=1", r"unknown key nosection"),
    ("train.max_steps=ten", r"train\.max_steps: expected an integer, got 'ten'"),
    ("train.max_steps=1.5", r"train\.max_steps: expected an integer"),
    ("data.hflip=maybe", r"data\.hflip: expected true or false"),
    ("scheduler.schedule=quadratic", r"scheduler\.schedule: 'quadratic' is not one of linear, cosine"),
    ("train.mixed_precision=no", r'train\.mixed_precision: False is not one of no, fp16, bf16, auto; YAML reads an '
                                 r'unquoted no as false: write "no"$'),
    ("model.block=transformer", r"unknown block type 'transformer' \(model\.block\); choose from"),
    ("model.block_out_channels=[8, x]", r"model\.block_out_channels\[1\]: expected an integer"),
    ("train.lr", r"expected section\.key=value"),
])
def test_bad_overrides_name_the_key_path(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("fashion-cpu", [override])


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(RecipeError, match="unknown recipe 'nope'; choose from .*fashion-cpu.*mnist-baseline"):
        load_recipe("nope")


def test_recipe_file_with_base_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: fashion-cpu\ntrain:\n  max_steps: 7\n")
    r = load_recipe(path)
    assert r.name == "mine" and r.train.max_steps == 7 and r.model.block == "resnet"
    saved = tmp_path / "resolved.yaml"
    saved.write_text(r.to_yaml())
    assert load_recipe(saved) == r  # a resolved recipe reloads to the same frozen object
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(RecipeError, match="bad.yaml: invalid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(RecipeError, match="circular"):
        load_recipe(tmp_path / "loop.yaml")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


# ------------------------------------------------------------------ names come from their registries

@pytest.mark.parametrize("override, message", [
    ("data.source=fashion-mnis", r"data\.source: 'fashion-mnis' is not one of fashion-mnist, .*imagefolder:PATH, "
                                 r"hub:ID.*; did you mean 'fashion-mnist'\?"),
    ("data.source=imagefolde:/x", r"data\.source: 'imagefolde:/x' is not one of .*did you mean 'imagefolder:/x'\?"),
    ("data.source=digits:x", r"data\.source: 'digits:x' is not one of .*; digits takes no argument"),
    ("sample.scheduler=ddin", r"sample\.scheduler: 'ddin' is not one of ddpm, ddim; did you mean 'ddim'\?"),
    ("scheduler.schedule=cosin", r"scheduler\.schedule: 'cosin' is not one of linear, cosine; did you mean"),
    ("model.block=convnex", r"unknown block type 'convnex' \(model\.block\); choose from .*did you mean 'convnext'"),
    ("model.convnext_expansion=two", r"model\.convnext_expansion: expected an integer, got 'two'"),
    ("model.convnext_expanson=2", r"unknown key model\.convnext_expanson; did you mean model\.convnext_expansion\?"),
])
def test_registry_names_are_checked_when_the_recipe_loads(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("fashion-cpu", [override])


def test_prefixed_sources_and_registry_defaults_load():
    for source in ("imagefolder:/some/folder", "hub:ylecun/mnist", "imagefolder", "voc"):
        assert load_recipe("fashion-cpu", [f"data.source={source}"]).data.source == source


def test_every_registry_backed_default_is_a_registry_key():
    import dataclasses

    from diffseg_hf import recipe as recipe_module
    from diffseg_hf import registries

    sections = [c for c in vars(recipe_module).values() if dataclasses.is_dataclass(c) and isinstance(c, type)]
    marked = [(c, f) for c in sections for f in dataclasses.fields(c) if "registry" in f.metadata]
    assert {f.name for _, f in marked} >= {"source", "schedule", "scheduler"}
    for cls, f in marked:
        assert f.metadata["registry"] in registries.REGISTRIES, (cls.__name__, f.name)
        if f.default is not None and f.default is not dataclasses.MISSING:
            registries.check(f.metadata["registry"], f.default, f"{cls.__name__}.{f.name}")


def test_block_options_come_from_the_block_declaration():
    from diffseg_hf.models import BLOCK_OPTIONS, RESIDUAL_BLOCKS

    r = load_recipe("mnist-convnext")
    assert r.model.block_options == BLOCK_OPTIONS == RESIDUAL_BLOCKS["convnext"].options
    assert r.model.convnext_expansion == 2 and r.model.convnext_kernel_size == 7  # attribute access as before
    r = load_recipe("mnist-convnext", ["model.convnext_expansion=3"])
    assert r.model.convnext_expansion == 3 and build_unet(r).config.convnext_expansion == 3
    model = r.to_dict()["model"]  # written flat, as before: saved recipes keep their keys
    assert "block_options" not in model and model["convnext_expansion"] == 3 and model["convnext_kernel_size"] == 7


def test_recipe_path_is_searched_before_the_shipped_recipes(tmp_path, monkeypatch):
    """$DIFFSEG_RECIPE_PATH: a user's recipe folders, searched in order before the shipped ones (shadowing them)."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir(), theirs.mkdir()
    (mine / "fashion-cpu.yaml").write_text("base: mnist-baseline\ndescription: my fashion-cpu\n")
    (theirs / "fashion-cpu.yaml").write_text("description: found second\n")
    (theirs / "my-cpu.yaml").write_text("base: fashion-cpu\ndescription: lr 5e-3\ntrain:\n  lr: 0.005\n")
    monkeypatch.setenv("DIFFSEG_RECIPE_PATH", f"{mine}:{theirs}")
    assert load_recipe("fashion-cpu").data.source == "mnist"  # the first folder's, built on a shipped base
    own = load_recipe("my-cpu")
    assert own.name == "my-cpu" and own.train.lr == 0.005 and own.model == load_recipe("mnist-baseline").model
    listed = list_recipes()
    assert listed["fashion-cpu"] == "my fashion-cpu" and listed["my-cpu"] == "lr 5e-3"
    assert set(ABLATION) <= set(listed) and list(listed) == sorted(listed)
    monkeypatch.setenv("DIFFSEG_RECIPE_PATH", f"{mine}:{tmp_path / 'nope'}")
    with pytest.raises(RecipeError, match=r"DIFFSEG_RECIPE_PATH names .*nope, which is not a folder; .* or unset"):
        load_recipe("mnist-baseline")


@pytest.mark.parametrize("name", ["fashion-seg", "fashion-seg-demo"])
def test_segment_recipes_give_both_arms_the_same_ensembling(name):
    seg = load_recipe(name).segment  # five conv heads against five baseline U-Nets, or one against one
    assert seg.conv_members == seg.baseline_members, (name, seg.conv_members, seg.baseline_members)
