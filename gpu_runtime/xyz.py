"""A1111 v1.8.0's "X/Y/Z plot" script (``scripts/xyz_grid.py``) as pure functions: parse, plan cells, assemble grids.

Why here and pure: ESD's client sends ``script_name: "x/y/z plot"`` with A1111's positional ``script_args``, and the
engine has to turn that into one ordinary generation per cell and then into A1111's reply (grids, lone images,
infotexts). Keeping every rule of the script (axis table, value parsing, seeds, cell order, grid layout, infotext
keys) in this module, with no torch and no diffusers, lets the tests state A1111's results without a GPU; the engine
only runs :meth:`XYZPlan.cells` and hands the images back to :func:`assemble`.

The flow::

    plan = parse_script_args("txt2img", request["script_args"])
    cells = plan.cells(request)                       # A1111's image order: z outer, then y, x inner
    images, infotexts = run each cell.params as an ordinary request (first image and its infotext)
    result = assemble(plan, images, infotexts)        # result.images / result.infotexts / index_of_first_image

Deliberate differences from A1111 (each is an error or a GPU saving, never a different picture):

- The 15-argument layout of v1.6/v1.7 (what ESD's client sends) is read as v1.7 read it (no ``vary_seeds_*``).
  v1.8.0 itself slice-assigns those 15 values into 18 slots and misreads or rejects them (reference §10).
- An axis with no values, an unknown axis index and a value that does not convert raise :class:`XYZError`. A1111
  raises a bare exception (HTTP 500) for the last two and returns an empty reply for the first.
- Each cell runs with ``batch_size = n_iter = 1``. A1111 runs the whole batch per cell but keeps only
  ``images[0]`` and ``infotexts[0]``. Image 0 of a batch has the cell's own seed, and its noise comes from a
  generator seeded for that image alone, so the extra images change nothing that A1111 returns (apart from float
  noise in batched kernels) and only cost GPU time. ``cells(..., keep_batch=True)`` keeps the batch.
- The axes that A1111 applies by writing ``opts`` directly (VAE, Clip skip, UniPC Order) become
  ``override_settings`` keys that a request's own ``override_settings`` win over, because in A1111 those overrides
  are applied to ``opts`` after the axis. A1111 also loses an axis VAE when the next cell changes the checkpoint;
  that side effect of its global state is not reproduced.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, permutations
from typing import Any

import numpy as np

SCRIPT_TITLE = "X/Y/Z plot"
"""``Script.title()``; the request's ``script_name`` is matched against it lower-cased."""

SCRIPT_NAME = SCRIPT_TITLE.lower()

LAYOUT_V17 = 15
LAYOUT_V18 = 18

SEED_LIMIT = 4294967294
"""A1111 draws random seeds with ``random.randrange(4294967294)``."""

MAX_GRID_MP = 200
"""``opts.img_max_size_mp`` default: A1111 refuses a plot whose cells add up to this many megapixels or more."""

GRID_TEXT_COLOR = (0, 0, 0)  # opts.grid_text_active_color "#000000"
GRID_BACKGROUND = (255, 255, 255)  # opts.grid_background_color "#ffffff"

_NOTHING_VALUES = (None, "", "None", "none")

# ControlNet's axes, appended after the built-in ones when the extension loads (reference §6.1).
_CONTROLNET_AXES = (
    "Enabled",
    "Model",
    "Weight",
    "Guidance Start",
    "Guidance End",
    "Control Mode",
    "Resize Mode",
    "Preprocessor",
    "Pre Resolution",
    "Pre Threshold A",
    "Pre Threshold B",
)


class XYZError(ValueError):
    """The x/y/z plot cannot run as asked; the text names the argument, axis or value at fault."""


@dataclass(frozen=True)
class AxisOption:
    """One entry of A1111's ``axis_options``: what a value on this axis does to a cell's request.

    ``how`` says where the value goes:

    - ``field``: the top-level request field ``target``;
    - ``override``: ``override_settings[target]`` (``override_bool`` first turns "true"/other into True/False);
    - ``opts``: ``override_settings[target]`` unless the request already sets that key (A1111 writes ``opts``
      directly and the request's ``override_settings`` are applied after it);
    - ``prompt_sr``, ``prompt_order``, ``styles``, ``uni_pc_order``, ``face_restore``, ``nothing``: the special
      cases of the same names in ``xyz_grid.py``.

    ``has_choices`` axes read the ``*_values_dropdown`` list unless ``csv_mode``. ``label_format`` is how the
    legend writes a value: ``label`` ("Steps: 20"), ``raw``, ``join`` (a permutation, ", "-joined), ``basename``
    (a model path's file name) or ``nothing``. ``tab`` limits an axis to one tab, which shifts later indices.
    """

    label: str
    value_type: type
    how: str
    target: str = ""
    has_choices: bool = False
    cost: float = 0.0
    label_format: str = "label"
    tab: str = "both"
    choices: tuple[str, ...] = ()


def _axis(label: str, value_type: type, how: str, target: str = "", **kw: Any) -> AxisOption:
    return AxisOption(label, value_type, how, target, **kw)


_BOOL_CHOICES = ("False", "True")

# A1111 v1.8.0's axis_options, in its order; each tab sees the entries whose ``tab`` is "both" or its own.
AXIS_OPTIONS: tuple[AxisOption, ...] = (
    _axis("Nothing", str, "nothing", label_format="nothing"),
    _axis("Seed", int, "field", "seed"),
    _axis("Var. seed", int, "field", "subseed"),
    _axis("Var. strength", float, "field", "subseed_strength"),
    _axis("Steps", int, "field", "steps"),
    _axis("Hires steps", int, "field", "hr_second_pass_steps", tab="txt2img"),
    _axis("CFG Scale", float, "field", "cfg_scale"),
    _axis("Image CFG Scale", float, "field", "image_cfg_scale", tab="img2img"),
    _axis("Prompt S/R", str, "prompt_sr", label_format="raw"),
    _axis("Prompt order", str, "prompt_order", label_format="join"),
    _axis("Sampler", str, "field", "sampler_name", has_choices=True, label_format="raw", tab="txt2img"),
    _axis("Hires sampler", str, "field", "hr_sampler_name", has_choices=True, tab="txt2img"),
    _axis("Sampler", str, "field", "sampler_name", has_choices=True, label_format="raw", tab="img2img"),
    _axis(
        "Checkpoint name",
        str,
        "override",
        "sd_model_checkpoint",
        has_choices=True,
        cost=1.0,
        label_format="basename",
    ),
    _axis("Negative Guidance minimum sigma", float, "field", "s_min_uncond"),
    _axis("Sigma Churn", float, "field", "s_churn"),
    _axis("Sigma min", float, "field", "s_tmin"),
    _axis("Sigma max", float, "field", "s_tmax"),
    _axis("Sigma noise", float, "field", "s_noise"),
    _axis(
        "Schedule type",
        str,
        "override",
        "k_sched_type",
        has_choices=True,
        choices=("Automatic", "karras", "exponential", "polyexponential"),
    ),
    _axis("Schedule min sigma", float, "override", "sigma_min"),
    _axis("Schedule max sigma", float, "override", "sigma_max"),
    _axis("Schedule rho", float, "override", "rho"),
    _axis("Eta", float, "field", "eta"),
    _axis("Clip skip", int, "opts", "CLIP_stop_at_last_layers"),
    _axis("Denoising", float, "field", "denoising_strength"),
    _axis("Initial noise multiplier", float, "field", "initial_noise_multiplier"),
    _axis("Extra noise", float, "override", "img2img_extra_noise"),
    _axis("Hires upscaler", str, "field", "hr_upscaler", has_choices=True, tab="txt2img"),
    _axis("Cond. Image Mask Weight", float, "field", "inpainting_mask_weight", tab="img2img"),
    _axis("VAE", str, "opts", "sd_vae", has_choices=True, cost=0.7),
    _axis("Styles", str, "styles", "styles", has_choices=True),
    _axis("UniPC Order", int, "uni_pc_order", "uni_pc_order", cost=0.5),
    _axis("Face restore", str, "face_restore", "restore_faces", label_format="raw"),
    _axis("Token merging ratio", float, "override", "token_merging_ratio"),
    _axis("Token merging ratio high-res", float, "override", "token_merging_ratio_hr"),
    _axis(
        "Always discard next-to-last sigma",
        str,
        "override_bool",
        "always_discard_next_to_last_sigma",
        has_choices=True,
        choices=_BOOL_CHOICES,
    ),
    _axis(
        "SGM noise multiplier",
        str,
        "override_bool",
        "sgm_noise_multiplier",
        has_choices=True,
        choices=_BOOL_CHOICES,
    ),
    _axis(
        "Refiner checkpoint",
        str,
        "field",
        "refiner_checkpoint",
        has_choices=True,
        cost=1.0,
        label_format="basename",
    ),
    _axis("Refiner switch at", float, "field", "refiner_switch_at"),
    _axis("RNG source", str, "override", "randn_source", has_choices=True, choices=("GPU", "CPU", "NV")),
    _axis(
        "FP8 mode",
        str,
        "override",
        "fp8_storage",
        has_choices=True,
        cost=0.9,
        choices=("Disable", "Enable for SDXL", "Enable"),
    ),
)


def axis_options(task: str) -> tuple[AxisOption, ...]:
    """The axes as the tab numbers them: ``x_type`` etc. index this list, so it must be filtered exactly as
    A1111's ``ui(is_img2img)`` filters it (txt2img drops the img2img-only entries and vice versa)."""
    if task not in ("txt2img", "img2img"):
        raise XYZError(f"x/y/z plot runs on txt2img or img2img, not {task!r}")
    return tuple(opt for opt in AXIS_OPTIONS if opt.tab in ("both", task))


# A1111's range syntax. The float patterns keep A1111's unescaped "." (any character before the decimals).
_RANGE_INT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_COUNT_INT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
_RANGE_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
_COUNT_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def csv_values(text: str) -> list[str]:
    """A1111's ``csv_string_to_list_strip``: the text is CSV (quotes protect commas, several lines are one list)
    and each value is stripped, so ``a, "b, c"`` is two values."""
    return [value.strip() for value in chain.from_iterable(csv.reader(io.StringIO(text)))]


def csv_string(values: Sequence[str]) -> str:
    """A1111's ``list_to_csv_string``: how dropdown values are written back as ``X Values`` in the infotext."""
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().strip()


def _number(text: str, kind: type, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise XYZError(f"{what}: {text!r} is not a valid {kind.__name__}") from None


def parse_int_values(values: Iterable[str], what: str = "value") -> list[int]:
    """Int axis values as A1111 expands them: ``1-5`` is 1..5 inclusive, ``1-5 (+2)`` steps by 2, ``1-10 [5]`` is
    ``int(linspace(1, 10, 5))`` (1, 3, 5, 7, 10); blanks are skipped; anything else must be an int."""
    out: list[int] = []
    for value in values:
        if value.strip() == "":
            continue
        step_match, count_match = _RANGE_INT.fullmatch(value), _COUNT_INT.fullmatch(value)
        if step_match is not None:
            start = _number(step_match.group(1), int, what)
            end = _number(step_match.group(2), int, what) + 1
            step = _number(step_match.group(3), int, what) if step_match.group(3) is not None else 1
            if step == 0:
                raise XYZError(f"{what}: {value!r} has a step of 0")
            out += list(range(start, end, step))
        elif count_match is not None:
            start = _number(count_match.group(1), int, what)
            end = _number(count_match.group(2), int, what)
            count = _number(count_match.group(3), int, what) if count_match.group(3) is not None else 1
            out += [int(v) for v in np.linspace(start=start, stop=end, num=count).tolist()]
        else:
            out.append(_number(value, int, what))
    return out


def parse_float_values(values: Iterable[str], what: str = "value") -> list[float]:
    """Float axis values as A1111 expands them: ``a-b (+s)`` is ``arange(a, b + s, s)`` (so float error can add a
    value past b, as in A1111), ``a-b [n]`` is ``linspace(a, b, n)``; blanks are skipped."""
    out: list[float] = []
    for value in values:
        if value.strip() == "":
            continue
        step_match, count_match = _RANGE_FLOAT.fullmatch(value), _COUNT_FLOAT.fullmatch(value)
        if step_match is not None:
            start = _number(step_match.group(1), float, what)
            end = _number(step_match.group(2), float, what)
            step = _number(step_match.group(3), float, what) if step_match.group(3) is not None else 1.0
            if step == 0:
                raise XYZError(f"{what}: {value!r} has a step of 0")
            out += [float(v) for v in np.arange(start, end + step, step).tolist()]
        elif count_match is not None:
            start = _number(count_match.group(1), float, what)
            end = _number(count_match.group(2), float, what)
            count = _number(count_match.group(3), int, what) if count_match.group(3) is not None else 1
            out += [float(v) for v in np.linspace(start=start, stop=end, num=count).tolist()]
        else:
            out.append(_number(value, float, what))
    return out


@dataclass(frozen=True)
class Axis:
    """One axis of a plan: its option, its parsed values, and the ``X Values`` text the infotext records."""

    name: str  # "X", "Y" or "Z"
    index: int
    option: AxisOption
    values: tuple[Any, ...]
    values_text: str
    seeds_fixed: bool = False  # Seed / Var. seed axes whose -1 were replaced (the infotext adds "Fixed X Values")

    @property
    def is_nothing(self) -> bool:
        """A "Nothing" axis has one dummy value and writes no label and no infotext entry."""
        return self.option.how == "nothing"

    @property
    def labels(self) -> list[str]:
        """The legend text of each value (A1111's ``format_value*`` functions)."""
        return [format_label(self.option, value) for value in self.values]


def format_label(option: AxisOption, value: Any) -> str:
    """How A1111 labels a value in the legend: "Label: value" with floats rounded to 8 places, the bare value,
    a ", "-joined permutation, a model path's file name, or nothing."""
    if isinstance(value, float):
        value = round(value, 8)
    if option.label_format == "nothing":
        return ""
    if option.label_format == "join":
        return ", ".join(value)
    if option.label_format == "basename":
        return posixpath.basename(str(value))
    if option.label_format == "raw":
        return str(value)
    return f"{option.label}: {value}"


@dataclass(frozen=True)
class Cell:
    """One generation of the plot: its position on the axes and the request that produces it. ``index`` is its
    place in A1111's image order (``x + y·len(xs) + z·len(xs)·len(ys)``), which is the order of :func:`assemble`'s
    ``cell_images``."""

    index: int
    x_index: int
    y_index: int
    z_index: int
    params: dict[str, Any]


def get_fixed_seed(seed: Any, rng: random.Random) -> int:
    """A1111's ``get_fixed_seed``: None, "", a non-numeric string and -1 become a random seed; others are kept."""
    if seed == "" or seed is None:
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except ValueError:
            seed = -1
    if seed == -1:
        return int(rng.randrange(SEED_LIMIT))
    return seed


def _quote(value: Any) -> str:
    """``infotext_utils.quote``: values with a comma, colon or newline are JSON strings."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


@dataclass
class XYZPlan:
    """The script's arguments, parsed: three axes and the output options. Built by :func:`parse_script_args`."""

    task: str
    x: Axis
    y: Axis
    z: Axis
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    vary_seeds: tuple[bool, bool, bool] = (False, False, False)
    margin_size: int = 0
    csv_mode: bool = False
    layout: int = LAYOUT_V18
    rng: random.Random = field(default_factory=random.Random, repr=False)

    @property
    def axes(self) -> tuple[Axis, Axis, Axis]:
        return (self.x, self.y, self.z)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(len(xs), len(ys), len(zs)); a "Nothing" axis counts 1."""
        return (len(self.x.values), len(self.y.values), len(self.z.values))

    @property
    def cell_count(self) -> int:
        nx, ny, nz = self.shape
        return nx * ny * nz

    def processing_order(self) -> list[tuple[int, int, int]]:
        """(ix, iy, iz) in the order A1111 runs the cells: the costliest axis (Checkpoint and Refiner 1.0, FP8 0.9,
        VAE 0.7, UniPC 0.5, others 0) is the outer loop, so the engine swaps models as rarely as A1111 does. Ties
        keep A1111's default, z outer then y then x."""
        cx, cy, cz = (axis.option.cost for axis in self.axes)
        first, second = "z", "y"
        if cx > cy and cx > cz:
            first, second = "x", ("y" if cy > cz else "z")
        elif cy > cx and cy > cz:
            first, second = "y", ("x" if cx > cz else "z")
        elif cz > cx and cz > cy:
            first, second = "z", ("x" if cx > cy else "y")
        third = ({"x", "y", "z"} - {first, second}).pop()
        sizes = dict(zip("xyz", self.shape, strict=True))
        order = []
        for a in range(sizes[first]):
            for b in range(sizes[second]):
                for c in range(sizes[third]):
                    position = {first: a, second: b, third: c}
                    order.append((position["x"], position["y"], position["z"]))
        return order

    def cells(
        self, base_params: Mapping[str, Any], *, rng: random.Random | None = None, keep_batch: bool = False
    ) -> list[Cell]:
        """Every cell's request, in A1111's image order (z outer, then y, x inner).

        Each request is ``base_params`` without ``script_name``/``script_args`` (the cell is an ordinary
        generation), with the three axis values applied in x, y, z order as A1111 applies them. Unless
        ``no_fixed_seeds``, a seed or subseed of -1 is fixed once (A1111's ``fix_seed(p)``), so every cell shares
        it; ``vary_seeds_x/y/z`` then add ``ix``, ``iy·xdim`` and ``iz·xdim·ydim`` to the seed as A1111 does (the
        dims count only the varied axes). ``batch_size`` and ``n_iter`` become 1 unless ``keep_batch`` (see the
        module docstring). Call this once per job: with -1 seeds each call draws new ones."""
        rng = rng if rng is not None else self.rng
        base = {k: v for k, v in base_params.items() if k not in ("script_name", "script_args")}
        nx, ny, nz = self.shape
        width, height = int(base.get("width") or 512), int(base.get("height") or 512)
        grid_mp = round(nx * ny * nz * width * height / 1000000)
        if grid_mp >= MAX_GRID_MP:
            raise XYZError(f"the x/y/z grid would be too large ({grid_mp} MPixels; the maximum is {MAX_GRID_MP})")
        if not self.no_fixed_seeds:
            base["seed"] = get_fixed_seed(base.get("seed", -1), rng)
            base["subseed"] = get_fixed_seed(base.get("subseed", -1), rng)
        vary_x, vary_y, vary_z = self.vary_seeds
        xdim = nx if vary_x else 1
        ydim = ny if vary_y else 1
        out = []
        for iz in range(nz):
            for iy in range(ny):
                for ix in range(nx):
                    params = dict(base)
                    params["override_settings"] = dict(base.get("override_settings") or {})
                    params["styles"] = list(base.get("styles") or [])
                    for axis, i in zip(self.axes, (ix, iy, iz), strict=True):
                        _apply(axis, axis.values[i], params)
                    if vary_x or vary_y or vary_z:
                        seed = int(params.get("seed", -1))
                        if vary_x:
                            seed += ix
                        if vary_y:
                            seed += iy * xdim
                        if vary_z:
                            seed += iz * xdim * ydim
                        params["seed"] = seed
                    if not keep_batch:
                        params["batch_size"] = 1
                        params["n_iter"] = 1
                    out.append(Cell(ix + iy * nx + iz * nx * ny, ix, iy, iz, params))
        return out

    def generation_params(self, z_index: int | None = None) -> dict[str, str]:
        """The entries A1111 adds to a grid's infotext, in its order: ``Script``, then ``X Type``/``X Values``
        (plus ``Fixed X Values`` for seed axes whose -1 were fixed), the same for Y, and for the main grid
        (``z_index`` None) also Z. A "Nothing" axis adds nothing. A sub-grid (``z_index`` given) has no Z entries."""
        params = {"Script": SCRIPT_TITLE}
        axes = [self.x, self.y] if z_index is not None else [self.x, self.y, self.z]
        for axis in axes:
            if axis.is_nothing:
                continue
            params[f"{axis.name} Type"] = axis.option.label
            params[f"{axis.name} Values"] = axis.values_text
            if axis.seeds_fixed:
                params[f"Fixed {axis.name} Values"] = ", ".join(str(v) for v in axis.values)
        return params


def _apply(axis: Axis, value: Any, params: dict[str, Any]) -> None:
    """Change one cell's request as A1111's ``AxisOption.apply`` changes its copy of ``p``."""
    opt = axis.option
    overrides: dict[str, Any] = params["override_settings"]
    if opt.how == "nothing":
        return
    if opt.how == "field":
        params[opt.target] = value
    elif opt.how == "override":
        overrides[opt.target] = value
    elif opt.how == "override_bool":
        overrides[opt.target] = str(value).lower() == "true"
    elif opt.how == "opts":
        if opt.target == "sd_vae":
            value = vae_setting(value)
        overrides.setdefault(opt.target, value)
    elif opt.how == "uni_pc_order":
        overrides.setdefault(opt.target, min(value, int(params.get("steps") or 50) - 1))
    elif opt.how == "styles":
        params["styles"] = [*params["styles"], *str(value).split(",")]
    elif opt.how == "face_restore":
        # A1111 also sets p.face_restoration_model for "CodeFormer"/"GFPGAN", but nothing reads that attribute:
        # the restorer comes from opts, so only the on/off switch has an effect.
        params["restore_faces"] = str(value).lower() in ("codeformer", "gfpgan", "true", "yes", "y", "1")
    elif opt.how == "prompt_sr":
        search = axis.values[0]
        prompt = params.get("prompt") or ""
        negative = params.get("negative_prompt") or ""
        if search not in prompt and search not in negative:
            raise XYZError(f"Prompt S/R did not find {search} in prompt or negative prompt.")
        params["prompt"] = prompt.replace(search, value)
        params["negative_prompt"] = negative.replace(search, value)
    elif opt.how == "prompt_order":
        params["prompt"] = reorder_prompt(params.get("prompt") or "", value)
    else:  # pragma: no cover - the table above only uses the kinds handled here
        raise XYZError(f"axis {opt.label} cannot be applied")


def reorder_prompt(prompt: str, tokens: Sequence[str]) -> str:
    """A1111's ``apply_order``: the tokens' places in the prompt, earliest first, receive ``tokens`` in the given
    order; the text between them stays. (A token missing from the prompt garbles it, as it does in A1111.)"""
    found = sorted(((prompt.find(token), token) for token in tokens), key=lambda item: item[0])
    parts = []
    rest = prompt
    for _, token in found:
        at = rest.find(token)
        parts.append(rest[:at])
        rest = rest[at + len(token) :]
    return "".join(part + tokens[i] for i, part in enumerate(parts)) + rest


def vae_setting(name: str) -> str:
    """A VAE axis value as an ``sd_vae`` setting: A1111's ``find_vae`` treats "auto"/"automatic" as Automatic and
    "none" as no VAE (any case); other names are matched against the VAE files by :func:`find_vae`."""
    lowered = name.lower()
    if lowered in ("auto", "automatic"):
        return "Automatic"
    if lowered == "none":
        return "None"
    return name


def find_vae(name: str, available: Iterable[str]) -> str:
    """The VAE A1111 picks for an axis value: the shortest known name containing the value (case-insensitive,
    stripped); "Automatic" when none does, and "Automatic"/"None" as in :func:`vae_setting`."""
    setting = vae_setting(name)
    if setting in ("Automatic", "None"):
        return setting
    wanted = name.lower().strip()
    matches = [vae for vae in sorted(available, key=len) if wanted in vae.lower()]
    return matches[0] if matches else "Automatic"


def _flag(value: Any) -> bool:
    return bool(value)


def _axis_index(value: Any, name: str, options: Sequence[AxisOption], task: str) -> AxisOption:
    if value is None:
        value = 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise XYZError(f"{name} type must be an axis index (an integer), got {value!r}")
    if 0 <= value < len(options):
        return options[value]
    controlnet = value - len(options)
    if 0 <= controlnet < len(_CONTROLNET_AXES):
        label = f"[ControlNet] {_CONTROLNET_AXES[controlnet]}"
        raise XYZError(f"{name} type {value} ({label}) is a ControlNet axis, which this runtime does not support")
    raise XYZError(f"{name} type {value} is not an x/y/z plot axis for {task} (0..{len(options) - 1})")


def _parse_axis(
    name: str,
    opt: AxisOption,
    index: int,
    values: Any,
    dropdown: Any,
    csv_mode: bool,
    no_fixed_seeds: bool,
    rng: random.Random,
) -> Axis:
    """A1111's ``process_axis`` plus ``fix_axis_seeds`` for one axis."""
    what = f"{name} axis ({opt.label})"
    if opt.how == "nothing":
        return Axis(name, index, opt, (0,), "")
    if opt.has_choices and not csv_mode:
        # A1111 reads the dropdown list and writes it back as CSV for the infotext's "X Values".
        if dropdown is None or dropdown == "":
            dropdown = []
        if not isinstance(dropdown, list | tuple):
            raise XYZError(f"{what}: the dropdown values must be a list, got {type(dropdown).__name__}")
        raw = [str(v) for v in dropdown]
        values = csv_string(raw)
    else:
        if values is None:
            values = ""
        if isinstance(values, int | float) and not isinstance(values, bool):
            values = str(values)
        if not isinstance(values, str):
            raise XYZError(f"{what}: the values must be text, got {type(values).__name__}")
        raw = csv_values(values)
    parsed: list[Any]
    if opt.value_type is int:
        parsed = parse_int_values(raw, what)
    elif opt.value_type is float:
        parsed = parse_float_values(raw, what)
    elif opt.how == "prompt_order":
        parsed = list(permutations(raw))
    else:
        parsed = list(raw)
    if not parsed:
        raise XYZError(f"{what} has no values")
    seeds_fixed = False
    if opt.label in ("Seed", "Var. seed") and not no_fixed_seeds:
        parsed = [int(rng.randrange(SEED_LIMIT)) if v in (None, "", -1) else v for v in parsed]
        seeds_fixed = True
    return Axis(name, index, opt, tuple(parsed), values, seeds_fixed)


def parse_script_args(task: str, script_args: Sequence[Any], rng: random.Random | None = None) -> XYZPlan:
    """Read x/y/z plot ``script_args`` in either layout, told apart by length: 15 (v1.6/v1.7, what ESD's client
    sends: ``... no_fixed_seeds, margin_size, csv_mode``) or 18 (v1.8: ``... no_fixed_seeds, vary_seeds_x,
    vary_seeds_y, vary_seeds_z, margin_size, csv_mode``). Values are parsed and -1 seeds on Seed / Var. seed axes
    drawn from ``rng`` now (unless ``no_fixed_seeds``), so the legend and infotext are final; pass a seeded
    ``random.Random`` for deterministic results."""
    options = axis_options(task)
    if not isinstance(script_args, list | tuple):
        raise XYZError(f"x/y/z plot script_args must be a list, got {type(script_args).__name__}")
    args = list(script_args)
    if len(args) == LAYOUT_V17:
        vary = (False, False, False)
        margin_size, csv_mode = args[13], args[14]
    elif len(args) == LAYOUT_V18:
        vary = (_flag(args[13]), _flag(args[14]), _flag(args[15]))
        margin_size, csv_mode = args[16], args[17]
    else:
        raise XYZError(
            f"x/y/z plot takes {LAYOUT_V17} script_args (A1111 v1.6/v1.7) or {LAYOUT_V18} (v1.8), got {len(args)}"
        )
    rng = rng if rng is not None else random.Random()
    draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds = (_flag(a) for a in args[9:13])
    csv_mode = _flag(csv_mode)
    try:
        margin = int(margin_size or 0)
    except (TypeError, ValueError):
        raise XYZError(f"x/y/z plot margin_size must be an integer, got {margin_size!r}") from None
    if margin < 0:
        raise XYZError(f"x/y/z plot margin_size must not be negative, got {margin}")
    axes = []
    for n, name in enumerate("XYZ"):
        type_arg, values, dropdown = args[3 * n : 3 * n + 3]
        opt = _axis_index(type_arg, name, options, task)
        index = options.index(opt)
        axes.append(_parse_axis(name, opt, index, values, dropdown, csv_mode, no_fixed_seeds, rng))
    return XYZPlan(
        task=task,
        x=axes[0],
        y=axes[1],
        z=axes[2],
        draw_legend=draw_legend,
        include_lone_images=include_lone_images,
        include_sub_grids=include_sub_grids,
        no_fixed_seeds=no_fixed_seeds,
        vary_seeds=vary,
        margin_size=margin,
        csv_mode=csv_mode,
        layout=len(args),
        rng=rng,
    )


# ---- assembling the reply -------------------------------------------------------------------------------------


@dataclass
class XYZResult:
    """What A1111's script returns: ``images`` (main grid, then sub-grids if asked, then the cells if asked),
    ``infotexts`` aligned with ``images``, and ``index_of_first_image`` (1: the grid is not a generated image).

    ``a1111_infotexts`` is the list A1111 itself puts in the reply's ``info``: it keeps every cell's infotext even
    when the cells are not returned, so it is longer than ``images`` then (failed cells are None there)."""

    images: list[Any]
    infotexts: list[str]
    index_of_first_image: int
    a1111_infotexts: list[str | None]


def image_grid(images: Sequence[Any], rows: int) -> Any:
    """A1111's ``image_grid`` with explicit rows: a black RGB canvas of ``cols x rows`` tiles the size of the
    first image, filled row by row (``cols = ceil(n / rows)``, rows capped at n)."""
    from PIL import Image

    rows = min(rows, len(images))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", size=(cols * w, rows * h), color="black")
    for i, img in enumerate(images):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(max(1, size))
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass
class _Line:
    text: str
    size: tuple[int, int] = (0, 0)
    allowed_width: int = 0


def draw_grid_annotations(
    im: Any, width: int, height: int, hor_texts: Sequence[str], ver_texts: Sequence[str], margin: int = 0
) -> Any:
    """A1111's ``draw_grid_annotations`` for x/y/z's one-label-per-column/row case, with Pillow's default font.

    The layout rules are A1111's: font size ``(width + height) // 25``, line spacing half of it; labels wrap at
    the column width (the left column is ``width · 3 // 4`` wide, and only exists when some row label is
    non-empty); the top band is the tallest column label plus two line spacings (none when all are empty);
    ``margin`` pixels separate cells; a line wider than its room is drawn with a smaller font."""
    from PIL import Image, ImageDraw

    fontsize = (width + height) // 25
    line_spacing = fontsize // 2
    fnt = _font(fontsize)
    pad_left = 0 if sum(len(t) for t in ver_texts) == 0 else width * 3 // 4
    cols = im.width // width
    rows = im.height // height
    if cols != len(hor_texts) or rows != len(ver_texts):
        raise XYZError(f"grid of {cols}x{rows} cells got {len(hor_texts)}x{len(ver_texts)} labels")

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1), GRID_BACKGROUND))

    def wrap(text: str, room: int) -> list[_Line]:
        # A1111's greedy wrap, including its empty first line when the first word alone is too wide.
        lines = [""]
        for word in text.split():
            candidate = f"{lines[-1]} {word}".strip()
            if measure.textlength(candidate, font=fnt) <= room:
                lines[-1] = candidate
            else:
                lines.append(word)
        out = []
        for line in lines:
            box = measure.multiline_textbbox((0, 0), line, font=fnt)
            out.append(_Line(line, (box[2] - box[0], box[3] - box[1]), room))
        return out

    hor = [wrap(t, width) for t in hor_texts]
    ver = [wrap(t, pad_left) for t in ver_texts]
    hor_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing for lines in hor]
    # A1111 subtracts the spacing once per line here, so a row label's height is just its lines' heights.
    ver_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing * len(lines) for lines in ver]
    pad_top = 0 if sum(hor_heights) == 0 else max(hor_heights) + line_spacing * 2

    size = (im.width + pad_left + margin * (cols - 1), im.height + pad_top + margin * (rows - 1))
    result = Image.new("RGB", size, GRID_BACKGROUND)
    for row in range(rows):
        for col in range(cols):
            cell = im.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))

    draw = ImageDraw.Draw(result)

    def draw_lines(x: float, y: float, lines: list[_Line]) -> None:
        for line in lines:
            font, size_now = fnt, fontsize
            while draw.multiline_textbbox((0, 0), line.text, font=font)[2] > line.allowed_width and size_now > 1:
                size_now -= 1
                font = _font(size_now)
            if line.text:
                _draw_centred(draw, (x, y + line.size[1] / 2), line.text, font)
            y += line.size[1] + line_spacing

    for col in range(cols):
        draw_lines(pad_left + (width + margin) * col + width / 2, pad_top / 2 - hor_heights[col] / 2, hor[col])
    for row in range(rows):
        draw_lines(pad_left / 2, pad_top + (height + margin) * row + height / 2 - ver_heights[row] / 2, ver[row])
    return result


def _draw_centred(draw: Any, xy: tuple[float, float], text: str, font: Any) -> None:
    try:
        draw.multiline_text(xy, text, font=font, fill=GRID_TEXT_COLOR, anchor="mm", align="center")
    except ValueError:  # a bitmap font has no anchors: centre by its box
        box = draw.multiline_textbbox((0, 0), text, font=font)
        at = (xy[0] - (box[2] - box[0]) / 2, xy[1] - (box[3] - box[1]) / 2)
        draw.multiline_text(at, text, font=font, fill=GRID_TEXT_COLOR, align="center")


def with_generation_params(infotext: str, extra: Mapping[str, Any]) -> str:
    """Add entries to an infotext where A1111's ``create_infotext`` puts ``extra_generation_params``: at the end
    of the parameters line but before ``Version`` and ``User``, which come last. An entry already there is
    replaced in place, as a dict update would."""
    head, _, line = infotext.rpartition("\n")
    items = _split_params(line) if line else []
    keys = [item.split(": ", 1)[0] for item in items]
    texts = {k: (k if k == v else f"{k}: {_quote(v)}") for k, v in extra.items()}
    for key, text in list(texts.items()):
        if key in keys:
            items[keys.index(key)] = text
            del texts[key]
    at = next((i for i, key in enumerate(keys) if key in ("Version", "User")), len(items))
    items[at:at] = list(texts.values())
    params = ", ".join(items)
    return f"{head}\n{params}" if head else params


def _split_params(line: str) -> list[str]:
    """Split a parameters line at the ", " between entries, not inside JSON-quoted values."""
    items, start, quoted, escaped = [], 0, False, False
    for i, char in enumerate(line):
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "," and line[i + 1 : i + 2] == " ":
            items.append(line[start:i])
            start = i + 2
    items.append(line[start:])
    return items


def assemble(plan: XYZPlan, cell_images: Sequence[Any], infotexts: Sequence[str | None]) -> XYZResult:
    """Build A1111's reply from the cells' first images and infotexts, given in :meth:`XYZPlan.cells` order.

    Per z value, the cells make an ``image_grid`` of ``len(ys)`` rows, annotated with the x labels above and the y
    labels on the left when ``draw_legend`` (with ``margin_size`` between cells; without a legend there is no
    margin, as in A1111). The z grids are joined in one row and, with a legend, get the z labels above (no margin).
    A failed cell (None) becomes a blank image the size of the first cell. The main grid's infotext is the first
    cell's plus :meth:`XYZPlan.generation_params`; a sub-grid's is its first cell's plus the X/Y entries."""
    from PIL import Image

    nx, ny, nz = plan.shape
    if len(cell_images) != plan.cell_count or len(infotexts) != plan.cell_count:
        raise XYZError(
            f"x/y/z plot has {plan.cell_count} cells, got {len(cell_images)} images and {len(infotexts)} infotexts"
        )
    if not any(img is not None for img in cell_images):
        return XYZResult([], [], 0, [])
    first = cell_images[0] if cell_images[0] is not None else next(img for img in cell_images if img is not None)
    cells = [img if img is not None else Image.new(first.mode, first.size) for img in cell_images]

    per_z = nx * ny
    sub_grids = []
    for iz in range(nz):
        tiles = cells[iz * per_z : (iz + 1) * per_z]
        grid = image_grid(tiles, rows=ny)
        if plan.draw_legend:
            w, h = tiles[0].size
            grid = draw_grid_annotations(grid, w, h, plan.x.labels, plan.y.labels, plan.margin_size)
        sub_grids.append(grid)
    main = image_grid(sub_grids, rows=1)
    if plan.draw_legend:
        w, h = sub_grids[0].size
        main = draw_grid_annotations(main, w, h, plan.z.labels, [""])

    cell_texts = [text or "" for text in infotexts]
    main_text = with_generation_params(cell_texts[0], plan.generation_params())
    sub_texts = [with_generation_params(cell_texts[iz * per_z], plan.generation_params(iz)) for iz in range(nz)]

    images = [main]
    texts = [main_text]
    if plan.include_sub_grids:
        images += sub_grids
        texts += sub_texts
    a1111_texts: list[str | None] = [*texts, *infotexts]
    if plan.include_lone_images:
        images += cells
        texts += cell_texts
    return XYZResult(images, texts, 1, a1111_texts)
