"""x/y/z plot semantics: each test states what A1111 v1.8.0's ``scripts/xyz_grid.py`` does with the same input."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from gpu_runtime import xyz
from gpu_runtime.xyz import XYZError, parse_script_args


def v17(
    x=(0, "", []), y=(0, "", []), z=(0, "", []), legend=True, lone=False, subs=False, keep=False, margin=0, csv=False
):
    """The 15-argument layout of v1.6/v1.7 (what ESD's client sends)."""
    return [*x, *y, *z, legend, lone, subs, keep, margin, csv]


def v18(
    x=(0, "", []),
    y=(0, "", []),
    z=(0, "", []),
    legend=True,
    lone=False,
    subs=False,
    keep=False,
    vary=(False,) * 3,
    margin=0,
    csv=False,
):
    """The 18-argument layout of v1.8."""
    return [*x, *y, *z, legend, lone, subs, keep, *vary, margin, csv]


BASE = {
    "prompt": "a cat on a mat",
    "negative_prompt": "blurry cat",
    "seed": 1234,
    "subseed": -1,
    "steps": 20,
    "cfg_scale": 7.0,
    "sampler_name": "Euler a",
    "width": 64,
    "height": 48,
    "batch_size": 2,
    "n_iter": 3,
    "styles": [],
    "override_settings": {},
    "script_name": "x/y/z plot",
    "script_args": [],
}


def rng():
    return random.Random(7)


def tiles(plan, size=(64, 48)):
    """One solid-colour image per cell, so the grid's layout can be read back from its pixels."""
    return [Image.new("RGB", size, (40 * c.index % 256, 10 + c.index, 200)) for c in plan.cells(BASE, rng=rng())]


# ---- arguments and axes -------------------------------------------------------------------------------------------


def test_esd_checkpoint_payload_reads_the_dropdown_and_the_steps_csv():
    args = [11, "", ["sd_xl_base_1.0.safetensors"], 4, "1,2", [], 0, "", [], True, False, False, False, 0, False]
    plan = parse_script_args("txt2img", args, rng=rng())
    assert plan.layout == 15
    assert plan.x.option.label == "Checkpoint name"
    assert plan.x.values == ("sd_xl_base_1.0.safetensors",)
    assert plan.x.values_text == "sd_xl_base_1.0.safetensors"
    assert plan.y.option.label == "Steps" and plan.y.values == (1, 2)
    assert plan.z.is_nothing and plan.z.values == (0,)
    assert plan.vary_seeds == (False, False, False)
    assert plan.draw_legend and not plan.include_lone_images and not plan.include_sub_grids


def test_18_argument_layout_reads_vary_seeds_margin_and_csv_mode():
    plan = parse_script_args("txt2img", v18(x=(4, "1,2", []), vary=(True, False, True), margin=6, csv=True), rng=rng())
    assert plan.layout == 18
    assert plan.vary_seeds == (True, False, True)
    assert plan.margin_size == 6 and plan.csv_mode


@pytest.mark.parametrize("length", [0, 14, 16, 17, 19])
def test_other_lengths_are_refused(length):
    with pytest.raises(XYZError, match=f"got {length}"):
        parse_script_args("txt2img", [0] * length)


def test_xyz_error_is_a_value_error():
    assert issubclass(XYZError, ValueError)


def test_txt2img_axis_indices_follow_a1111():
    labels = [opt.label for opt in xyz.axis_options("txt2img")]
    assert len(labels) == 39
    expected = {0: "Nothing", 1: "Seed", 4: "Steps", 5: "Hires steps", 7: "Prompt S/R", 9: "Sampler"}
    expected |= {10: "Hires sampler", 11: "Checkpoint name", 22: "Clip skip", 26: "Hires upscaler", 27: "VAE"}
    expected |= {35: "Refiner checkpoint", 36: "Refiner switch at", 37: "RNG source", 38: "FP8 mode"}
    assert {i: labels[i] for i in expected} == expected


def test_img2img_drops_hires_axes_and_adds_image_cfg_and_mask_weight():
    labels = [opt.label for opt in xyz.axis_options("img2img")]
    assert len(labels) == 38
    assert "Hires steps" not in labels and "Hires sampler" not in labels and "Hires upscaler" not in labels
    assert labels[5] == "CFG Scale" and labels[6] == "Image CFG Scale"
    assert labels[9] == "Sampler" and labels[10] == "Checkpoint name"
    assert labels[25] == "Cond. Image Mask Weight" and labels[26] == "VAE" and labels[34] == "Refiner checkpoint"


def test_axes_with_choices_are_the_dropdown_ones():
    with_choices = {opt.label for opt in xyz.axis_options("txt2img") if opt.has_choices}
    assert with_choices == {
        "Sampler",
        "Hires sampler",
        "Checkpoint name",
        "Schedule type",
        "Hires upscaler",
        "VAE",
        "Styles",
        "Always discard next-to-last sigma",
        "SGM noise multiplier",
        "Refiner checkpoint",
        "RNG source",
        "FP8 mode",
    }


def test_csv_mode_reads_the_text_for_a_choice_axis():
    plan = parse_script_args("txt2img", v17(x=(9, 'Euler a,"DPM++ 2M, Karras"', ["ignored"]), csv=True), rng=rng())
    assert plan.x.values == ("Euler a", "DPM++ 2M, Karras")


def test_unknown_axis_index_is_named():
    with pytest.raises(XYZError, match="Y type 60"):
        parse_script_args("txt2img", v17(y=(60, "1", [])))
    with pytest.raises(XYZError, match=r"39 \(\[ControlNet\] Enabled\)"):
        parse_script_args("txt2img", v17(x=(39, "True", [])))
    with pytest.raises(XYZError, match=r"38 \(\[ControlNet\] Enabled\)"):
        parse_script_args("img2img", v17(x=(38, "True", [])))


def test_none_axis_type_is_nothing():
    plan = parse_script_args("txt2img", v17(x=(None, "", None)))
    assert plan.x.is_nothing


def test_bad_values_and_empty_axes_are_refused():
    with pytest.raises(XYZError, match=r"X axis \(Steps\): '1.5' is not a valid int"):
        parse_script_args("txt2img", v17(x=(4, "1.5", [])))
    with pytest.raises(XYZError, match=r"Y axis \(Checkpoint name\) has no values"):
        parse_script_args("txt2img", v17(y=(11, "", [])))


# ---- values -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1-5", [1, 2, 3, 4, 5]),
        ("1-5 (+2)", [1, 3, 5]),
        ("1-10 [5]", [1, 3, 5, 7, 10]),
        ("10-1 (-3)", [10, 7, 4]),  # range(10, 1 + 1, -3)
        (" 3 , 7,, 9 ", [3, 7, 9]),
        ("1-3, 8", [1, 2, 3, 8]),
    ],
)
def test_int_values(text, expected):
    assert xyz.parse_int_values(xyz.csv_values(text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5-1 (+0.25)", [0.5, 0.75, 1.0]),
        ("0-1 [3]", [0.0, 0.5, 1.0]),
        ("7, 7.5", [7.0, 7.5]),
        ("1-3", [1.0, 2.0, 3.0]),
    ],
)
def test_float_values(text, expected):
    assert xyz.parse_float_values(xyz.csv_values(text)) == expected


def test_float_step_ranges_keep_arange_rounding():
    # A1111 uses arange(a, b + s, s): here float error adds a value past the end.
    assert xyz.parse_float_values(["1-1.2 (+0.1)"]) == [1.0, 1.1, 1.2000000000000002, 1.3000000000000003]


def test_csv_values_honour_quotes_only_right_after_a_comma():
    assert xyz.csv_values('a,"b, c", d') == ["a", "b, c", "d"]
    # csv.reader without skipinitialspace, as in A1111: a space before the quote makes it literal
    assert xyz.csv_values('a, "b, c"') == ["a", '"b', 'c"']


def test_seed_axis_fixes_minus_one_unless_no_fixed_seeds():
    plan = parse_script_args("txt2img", v17(x=(1, "-1, 5, -1", [])), rng=random.Random(3))
    draws = random.Random(3)
    assert plan.x.values == (draws.randrange(4294967294), 5, draws.randrange(4294967294))
    assert plan.x.seeds_fixed
    kept = parse_script_args("txt2img", v17(x=(1, "-1, 5", []), keep=True), rng=rng())
    assert kept.x.values == (-1, 5) and not kept.x.seeds_fixed


def test_prompt_order_gives_permutations():
    plan = parse_script_args("txt2img", v17(x=(8, "cat, mat", [])))
    assert plan.x.values == (("cat", "mat"), ("mat", "cat"))
    assert plan.x.labels == ["cat, mat", "mat, cat"]


def test_labels_follow_a1111_formats():
    plan = parse_script_args(
        "txt2img", v17(x=(6, "7, 1.123456789", []), y=(11, "", ["sub/dir/model.safetensors"]), z=(9, "", ["Euler"]))
    )
    assert plan.x.labels == ["CFG Scale: 7.0", "CFG Scale: 1.12345679"]
    assert plan.y.labels == ["model.safetensors"]
    assert plan.z.labels == ["Euler"]


# ---- cells --------------------------------------------------------------------------------------------------------


def test_two_by_two_cells_come_in_a1111_image_order():
    plan = parse_script_args("txt2img", v17(x=(4, "10, 20", []), y=(6, "5, 9", [])), rng=rng())
    cells = plan.cells(BASE, rng=rng())
    assert [(c.index, c.x_index, c.y_index, c.z_index) for c in cells] == [
        (0, 0, 0, 0),
        (1, 1, 0, 0),
        (2, 0, 1, 0),
        (3, 1, 1, 0),
    ]
    assert [(c.params["steps"], c.params["cfg_scale"]) for c in cells] == [(10, 5.0), (20, 5.0), (10, 9.0), (20, 9.0)]
    for c in cells:
        assert "script_name" not in c.params and "script_args" not in c.params
        assert c.params["seed"] == 1234
        assert c.params["batch_size"] == 1 and c.params["n_iter"] == 1
    assert BASE["steps"] == 20  # the base request is not changed


def test_keep_batch_leaves_the_batch():
    plan = parse_script_args("txt2img", v17(x=(4, "10", [])))
    assert plan.cells(BASE, keep_batch=True)[0].params["batch_size"] == 2


def test_z_is_outermost_in_image_order():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", []), y=(6, "3,4", []), z=(21, "0, 1", [])))
    cells = plan.cells(BASE)
    assert [(c.x_index, c.y_index, c.z_index) for c in cells][:5] == [
        (0, 0, 0),
        (1, 0, 0),
        (0, 1, 0),
        (1, 1, 0),
        (0, 0, 1),
    ]
    assert cells[4].params["eta"] == 1.0 and cells[4].index == 4


def test_costliest_axis_runs_outermost():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", []), y=(11, "", ["a", "b"])))
    assert plan.processing_order() == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    plan = parse_script_args("txt2img", v17(x=(11, "", ["a", "b"]), y=(4, "1,2", [])))
    assert plan.processing_order() == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_minus_one_seed_is_fixed_once_for_all_cells():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2,3", [])))
    cells = plan.cells({**BASE, "seed": -1}, rng=random.Random(11))
    draws = random.Random(11)
    seed, subseed = draws.randrange(4294967294), draws.randrange(4294967294)
    assert {c.params["seed"] for c in cells} == {seed}
    assert {c.params["subseed"] for c in cells} == {subseed}


def test_no_fixed_seeds_keeps_minus_one():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", []), keep=True))
    assert {c.params["seed"] for c in plan.cells({**BASE, "seed": -1})} == {-1}


def test_vary_seeds_add_the_cell_position():
    plan = parse_script_args("txt2img", v18(x=(4, "1,2,3", []), y=(6, "5,6", []), vary=(True, False, False)))
    assert [c.params["seed"] for c in plan.cells(BASE)] == [1234, 1235, 1236, 1234, 1235, 1236]
    plan = parse_script_args("txt2img", v18(x=(4, "1,2,3", []), y=(6, "5,6", []), vary=(True, True, False)))
    assert [c.params["seed"] for c in plan.cells(BASE)] == [1234, 1235, 1236, 1237, 1238, 1239]
    # only the varied axes count: y alone steps by 1
    plan = parse_script_args("txt2img", v18(x=(4, "1,2,3", []), y=(6, "5,6", []), vary=(False, True, False)))
    assert [c.params["seed"] for c in plan.cells(BASE)] == [1234, 1234, 1234, 1235, 1235, 1235]


def test_seed_axis_with_vary_seeds_adds_to_the_axis_seed():
    plan = parse_script_args("txt2img", v18(x=(1, "100, 200", []), vary=(True, False, False)))
    assert [c.params["seed"] for c in plan.cells(BASE)] == [100, 201]


def test_prompt_search_and_replace_changes_prompt_and_negative_prompt():
    plan = parse_script_args("txt2img", v17(x=(7, "cat, dog, fox", [])))
    cells = plan.cells(BASE)
    assert [c.params["prompt"] for c in cells] == ["a cat on a mat", "a dog on a mat", "a fox on a mat"]
    assert [c.params["negative_prompt"] for c in cells] == ["blurry cat", "blurry dog", "blurry fox"]


def test_prompt_search_text_must_be_in_a_prompt():
    plan = parse_script_args("txt2img", v17(x=(7, "horse, dog", [])))
    with pytest.raises(XYZError, match="did not find horse"):
        plan.cells(BASE)


def test_prompt_order_reorders_the_tokens():
    plan = parse_script_args("txt2img", v17(x=(8, "cat, mat", [])))
    assert [c.params["prompt"] for c in plan.cells(BASE)] == ["a cat on a mat", "a mat on a cat"]
    assert xyz.reorder_prompt("one, two, three", ("three", "one", "two")) == "three, one, two"


def test_settings_axes_go_to_override_settings():
    args = v17(x=(11, "", ["a.safetensors"]), y=(27, "", ["automatic"]), z=(37, "", ["CPU"]))
    params = parse_script_args("txt2img", args).cells(BASE)[0].params
    assert params["override_settings"] == {
        "sd_model_checkpoint": "a.safetensors",
        "sd_vae": "Automatic",
        "randn_source": "CPU",
    }
    assert BASE["override_settings"] == {}


def test_request_overrides_win_over_opts_axes():
    # A1111 writes Clip skip / VAE straight into opts, then applies the request's override_settings over them.
    plan = parse_script_args("txt2img", v17(x=(22, "1, 2", [])))
    base = {**BASE, "override_settings": {"CLIP_stop_at_last_layers": 3}}
    assert [c.params["override_settings"]["CLIP_stop_at_last_layers"] for c in plan.cells(base)] == [3, 3]
    assert [c.params["override_settings"]["CLIP_stop_at_last_layers"] for c in plan.cells(BASE)] == [1, 2]


def test_special_axes():
    args = v17(x=(29, "3, 30", []), y=(30, "CodeFormer, no", []), z=(33, "", ["True", "False"]))
    cells = parse_script_args("txt2img", args).cells(BASE)
    assert [c.params["override_settings"]["uni_pc_order"] for c in cells[:2]] == [3, 19]  # min(x, steps - 1)
    assert [c.params["restore_faces"] for c in cells[::2]] == [True, False, True, False]
    assert [c.params["override_settings"]["always_discard_next_to_last_sigma"] for c in cells[::4]] == [True, False]


def test_styles_axis_extends_the_styles():
    plan = parse_script_args("txt2img", v17(x=(28, "", ["Cinematic", "a,b"])))
    cells = plan.cells({**BASE, "styles": ["base"]})
    assert [c.params["styles"] for c in cells] == [["base", "Cinematic"], ["base", "a", "b"]]


def test_fields_axes():
    args = v17(x=(35, "", ["refiner.safetensors"]), y=(36, "0.5, 0.8", []), z=(26, "", ["Latent"]))
    cell = parse_script_args("txt2img", args).cells(BASE)[1]
    assert cell.params["refiner_checkpoint"] == "refiner.safetensors"
    assert cell.params["refiner_switch_at"] == 0.8 and cell.params["hr_upscaler"] == "Latent"


def test_too_large_a_grid_is_refused():
    plan = parse_script_args("txt2img", v17(x=(4, "1-100", [])))
    with pytest.raises(XYZError, match="too large"):
        plan.cells({**BASE, "width": 2048, "height": 2048})


# ---- models -------------------------------------------------------------------------------------------------------


def test_models_named_lists_checkpoints_refiners_and_vaes():
    """The control plane's reading of the axes (gpu_runtime.protocol.scripts) agrees with the plot's own tables."""
    from gpu_runtime.protocol.scripts import XYZ_MODEL_AXES, xyz_model_names

    args = v17(
        x=(11, "", ["a.safetensors", "b.ckpt"]),
        y=(27, "", ["Automatic", "None", "vae.pt"]),
        z=(35, "", ["None", "a.safetensors", "r.safetensors"]),
    )
    assert xyz_model_names("txt2img", args) == {
        "Stable-diffusion": ["a.safetensors", "b.ckpt", "r.safetensors"],
        "VAE": ["vae.pt"],
    }
    assert xyz_model_names("txt2img", v17(x=(4, "1,2", []))) == {}
    img2img = v17(x=(10, "", ["c.safetensors"]), y=(26, "", ["v.safetensors"]))
    assert xyz_model_names("img2img", img2img) == {"Stable-diffusion": ["c.safetensors"], "VAE": ["v.safetensors"]}
    for task, axes in XYZ_MODEL_AXES.items():
        labels = {index: xyz.axis_options(task)[index].label for index in axes}
        assert set(labels.values()) == {"Checkpoint name", "VAE", "Refiner checkpoint"}, task


def test_find_vae_picks_the_shortest_match():
    known = ["vae-ft-mse-840000.safetensors", "sdxl_vae.safetensors", "vae-ft-mse.safetensors"]
    assert xyz.find_vae("ft-MSE", known) == "vae-ft-mse.safetensors"
    assert xyz.find_vae("missing", known) == "Automatic"
    assert xyz.find_vae("NONE", known) == "None"


# ---- assembling ---------------------------------------------------------------------------------------------------


def test_grid_without_legend_is_the_cells_tiled():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", []), y=(6, "3,4", []), legend=False, margin=10))
    images = tiles(plan)
    result = xyz.assemble(plan, images, ["p\nSteps: 1"] * 4)
    assert len(result.images) == 1 and result.index_of_first_image == 1
    grid = result.images[0]
    assert grid.size == (128, 96)  # no margin without a legend, as in A1111
    for i, (x, y) in enumerate([(0, 0), (64, 0), (0, 48), (64, 48)]):
        assert grid.getpixel((x + 5, y + 5)) == images[i].getpixel((0, 0))


def test_legend_adds_a_label_row_and_column_and_the_margin():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", []), y=(6, "3,4", []), margin=10))
    images = tiles(plan)
    grid = xyz.assemble(plan, images, [""] * 4).images[0]
    pad_left = 64 * 3 // 4
    assert grid.width == 2 * 64 + pad_left + 10
    pad_top = grid.height - (2 * 48 + 10)
    assert pad_top > 2 * ((64 + 48) // 25 // 2)  # text height plus two line spacings
    assert grid.getpixel((pad_left + 64 + 10 + 5, pad_top + 48 + 10 + 5)) == images[3].getpixel((0, 0))
    assert grid.getpixel((pad_left + 64 + 5, pad_top + 5)) == (255, 255, 255)  # the margin is background


def test_nothing_axes_add_no_legend_room():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", [])))
    grid = xyz.assemble(plan, tiles(plan), [""] * 2).images[0]
    assert grid.height > 48 and grid.width == 128  # x labels on top, no y column
    plan = parse_script_args("txt2img", v17(y=(4, "1,2", [])))
    grid = xyz.assemble(plan, tiles(plan), [""] * 2).images[0]
    assert grid.height == 96 and grid.width == 64 + 48


def test_z_grids_are_joined_in_a_row_with_sub_grids_and_lone_images():
    args = v17(x=(4, "1,2", []), z=(6, "3,4,5", []), legend=False, subs=True, lone=True)
    plan = parse_script_args("txt2img", args)
    images = tiles(plan)
    texts = [f"p\nSteps: {i}" for i in range(6)]
    result = xyz.assemble(plan, images, texts)
    assert [im.size for im in result.images] == [(384, 48), (128, 48), (128, 48), (128, 48)] + [(64, 48)] * 6
    assert result.images[4:] == images
    assert len(result.infotexts) == len(result.images)
    assert result.infotexts[4:] == texts
    assert result.images[0].getpixel((128 + 64 + 1, 1)) == images[3].getpixel((0, 0))


def test_z_legend_adds_a_title_row_above_the_joined_sub_grids():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", []), z=(6, "3,4", []), subs=True))
    main, sub_3, sub_4 = xyz.assemble(plan, tiles(plan), [""] * 4).images
    assert sub_3.size == sub_4.size and sub_3.height > 48  # each sub-grid has its x labels
    assert main.width == 2 * sub_3.width  # no margin and no label column between z grids
    assert main.height > sub_3.height  # the z labels ("CFG Scale: 3.0") sit on top


def test_sub_grids_are_returned_even_with_one_z():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", []), subs=True))
    assert len(xyz.assemble(plan, tiles(plan), [""] * 2).images) == 2


def test_grid_infotext_adds_the_script_entries_before_version():
    plan = parse_script_args(
        "txt2img", v17(x=(4, "1,2", []), y=(11, "", ["m.safetensors", "n.safetensors"]), z=(6, "5-6", []))
    )
    texts = [f"a cat\nNegative prompt: dog\nSteps: {i}, Seed: 1, Version: v1.8.0" for i in range(8)]
    result = xyz.assemble(plan, tiles(plan), texts)
    assert result.infotexts[0] == (
        "a cat\nNegative prompt: dog\nSteps: 0, Seed: 1, Script: X/Y/Z plot, X Type: Steps, "
        'X Values: "1,2", Y Type: Checkpoint name, Y Values: "m.safetensors,n.safetensors", '
        "Z Type: CFG Scale, Z Values: 5-6, Version: v1.8.0"
    )
    # A1111 keeps every cell's infotext in info even when the cells are not returned
    assert len(result.images) == 1 and len(result.infotexts) == 1
    assert result.a1111_infotexts == [result.infotexts[0], *texts]


def test_sub_grid_infotexts_have_no_z_entries():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", []), z=(6, "5,6", []), subs=True))
    texts = [f"p\nSteps: {i}" for i in range(4)]
    result = xyz.assemble(plan, tiles(plan), texts)
    assert result.infotexts[1] == 'p\nSteps: 0, Script: X/Y/Z plot, X Type: Steps, X Values: "1,2"'
    assert result.infotexts[2] == 'p\nSteps: 2, Script: X/Y/Z plot, X Type: Steps, X Values: "1,2"'
    assert "Z Type: CFG Scale" in result.infotexts[0]


def test_fixed_seed_values_are_recorded():
    plan = parse_script_args("txt2img", v17(x=(1, "-1, 5", [])), rng=random.Random(3))
    fixed = plan.x.values[0]
    assert plan.generation_params() == {
        "Script": "X/Y/Z plot",
        "X Type": "Seed",
        "X Values": "-1, 5",
        "Fixed X Values": f"{fixed}, 5",
    }


def test_failed_cells_become_blank_images():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", []), legend=False, lone=True))
    good = Image.new("RGB", (64, 48), (255, 0, 0))
    result = xyz.assemble(plan, [good, None], ["p\nSteps: 1", None])
    assert result.images[0].size == (128, 48)
    assert result.images[2].size == (64, 48)
    assert result.infotexts[2] == "" and result.a1111_infotexts[2] is None
    assert xyz.assemble(plan, [None, None], [None, None]).images == []


def test_assemble_checks_the_cell_count():
    plan = parse_script_args("txt2img", v17(x=(4, "1,2", [])))
    with pytest.raises(XYZError, match="2 cells"):
        xyz.assemble(plan, [Image.new("RGB", (8, 8))], [""])


def test_with_generation_params_respects_quoted_values():
    text = 'p\nSteps: 1, Lora hashes: "a: 1, Version: 2", Version: v1.8.0'
    assert xyz.with_generation_params(text, {"Script": "X/Y/Z plot"}) == (
        'p\nSteps: 1, Lora hashes: "a: 1, Version: 2", Script: X/Y/Z plot, Version: v1.8.0'
    )
