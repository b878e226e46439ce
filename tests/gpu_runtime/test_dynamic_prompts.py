"""Dynamic Prompts (sd-dynamic-prompts v2.17.0 on dynamicprompts 0.30) as the runtime expands it.

The pinned prompt lists marked "library" were produced by dynamicprompts 0.30.4's ``RandomPromptGenerator`` with the
same seeds, so they check that the random stream is drawn the same way, not just that the output looks plausible.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gpu_runtime.dynamic_prompts import (
    DynamicPromptsError,
    DynamicPromptsOptions,
    expand,
    parse_args,
    uses_syntax,
    wildcards_named,
)

RANDOM = parse_args([True])
COMBINATORIAL = parse_args([True, True])


def run(prompt, negative="", options=RANDOM, *, batch_size=1, n_iter=4, seed=7, wildcards=None, **kw):
    return expand(
        prompt, negative, options, batch_size=batch_size, n_iter=n_iter, seed=seed, wildcards=wildcards or {}, **kw
    )


def args(**named):
    """The 18 positional args ESD sends, from the option names."""
    options = DynamicPromptsOptions(**named)
    return [getattr(options, name) for name in DynamicPromptsOptions.__dataclass_fields__]


# -- args ---------------------------------------------------------------------------------------------------------


def test_parse_args_defaults_for_missing_args():
    assert parse_args([]) == DynamicPromptsOptions()
    options = parse_args([True, True, 2])
    assert (options.is_enabled, options.is_combinatorial, options.combinatorial_batches) == (True, True, 2)
    assert options.disable_negative_prompt is True and options.max_generations == 0 and not options.use_fixed_seed
    full = args(use_fixed_seed=True, max_generations=5, magic_model="Gustavosta/MagicPrompt-Stable-Diffusion")
    assert len(full) == 18
    parsed = parse_args(full)
    assert parsed.use_fixed_seed and parsed.max_generations == 5
    assert parsed.magic_model == "Gustavosta/MagicPrompt-Stable-Diffusion"


def test_parse_args_rejects_nonsense():
    with pytest.raises(DynamicPromptsError):
        parse_args([True] * 19)
    with pytest.raises(DynamicPromptsError, match="combinatorial_batches"):
        parse_args([True, True, 0])
    with pytest.raises(DynamicPromptsError, match="is_combinatorial"):
        parse_args([True, "maybe"])


# -- random mode --------------------------------------------------------------------------------------------------


def test_random_mode_gives_only_the_variants_and_is_deterministic_for_a_seed():
    first = run("{red|blue} car", batch_size=2, n_iter=2)
    assert set(first.all_prompts) <= {"red car", "blue car"} and len(first.all_prompts) == 4
    assert first.all_prompts == ["blue car", "red car", "blue car", "red car"]  # library, seeds 7..10
    assert first.all_seeds == [7, 8, 9, 10]
    assert (first.batch_size, first.n_iter) == (2, 2)
    assert run("{red|blue} car", batch_size=2, n_iter=2) == first
    many = {tuple(run("{red|blue} car", seed=seed).all_prompts) for seed in range(20)}
    assert len(many) > 1  # the seed drives the choice


def test_choose_n_picks_distinct_options_joined_by_the_separator():
    expansion = run("{2$$a|b|c}, {0.2::x|y}", n_iter=4, seed=100)
    assert expansion.all_prompts == ["b,c, y", "c,b, y", "c,a, y", "c,b, y"]  # library, seeds 100..103
    for text in run("{2$$, $$a|b|c}", n_iter=30).all_prompts:
        picked = text.split(", ")
        assert len(picked) == 2 and len(set(picked)) == 2 and set(picked) <= {"a", "b", "c"}
    for text in run("{2$$ and $$a|b|c}", n_iter=10).all_prompts:
        assert " and " in text
    for text in run("{1-3$$a|b|c}", n_iter=40).all_prompts:
        assert 1 <= len(text.split(",")) <= 3


def test_weights_bias_the_choice():
    counts = Counter(run("{1::rare|19::common}", n_iter=400).all_prompts)
    assert counts["common"] > 300 and counts["rare"] > 0 and set(counts) == {"rare", "common"}


def test_nested_variants_expand():
    prompts = set(run("{a|{b|c}} x", n_iter=60).all_prompts)
    assert prompts == {"a x", "b x", "c x"}


def test_fixed_seed_gives_one_seed_and_one_prompt():
    expansion = run("{red|blue|green|white} car", options=parse_args(args(use_fixed_seed=True)), batch_size=2, n_iter=3)
    assert expansion.all_seeds == [7] * 6
    assert len(set(expansion.all_prompts)) == 1  # the prompt RNG is reseeded with the same seed for each image


def test_unlinked_seed_draws_from_its_own_stream():
    options = parse_args(args(unlink_seed_from_prompt=True))
    one = run("{a|b|c|d|e}", options=options, n_iter=6, unlinked_rng=random.Random(1))
    two = run("{a|b|c|d|e}", options=options, n_iter=6, seed=99, unlinked_rng=random.Random(1))
    assert one.all_prompts == two.all_prompts  # the image seed no longer picks the prompt
    assert one.all_seeds == [7, 8, 9, 10, 11, 12] and two.all_seeds == [99 + i for i in range(6)]


# -- a prompt without syntax --------------------------------------------------------------------------------------


def test_prompt_without_syntax_is_unchanged_with_seeds_seed_plus_i():
    text = "a photo of a (cat:1.2), [simple background], 8k"
    assert not uses_syntax(text)
    expansion = run(text, "blurry, lowres", batch_size=2, n_iter=3, seed=41)
    assert expansion.all_prompts == [text] * 6
    assert expansion.all_negative_prompts == ["blurry, lowres"] * 6
    assert expansion.all_seeds == [41 + i for i in range(6)]
    assert (expansion.batch_size, expansion.n_iter) == (2, 3)


def test_prompt_without_syntax_in_combinatorial_mode_is_its_one_combination():
    # The extension makes every combination of the prompt: one here, so n_iter becomes 1 (as in A1111).
    expansion = run("a red car", "blurry", COMBINATORIAL, batch_size=2, n_iter=3, seed=41)
    assert expansion.all_prompts == ["a red car"] and expansion.all_negative_prompts == ["blurry"]
    assert expansion.all_seeds == [41] and expansion.n_iter == 1


def test_disabled_script_changes_nothing():
    expansion = run("{a|b}", options=parse_args([False, True]), batch_size=2, n_iter=2)
    assert expansion.all_prompts == ["{a|b}"] * 4 and expansion.all_seeds == [7, 8, 9, 10]


def test_unparsable_prompt_is_used_unchanged_as_a1111_does_when_the_script_fails():
    expansion = run("a $5 bill", n_iter=2)
    assert expansion.all_prompts == ["a $5 bill"] * 2 and expansion.all_seeds == [7, 8]
    assert expansion.notes and "cannot parse" in expansion.notes[0]
    assert not uses_syntax("a $5 bill")


# -- combinatorial mode -------------------------------------------------------------------------------------------


def test_combinatorial_enumerates_in_the_library_order_and_sets_n_iter():
    expansion = run("{red|blue} {car|boat}", options=COMBINATORIAL, batch_size=3, n_iter=1, seed=10)
    assert expansion.all_prompts == ["red car", "red boat", "blue car", "blue boat"]
    assert expansion.all_seeds == [10, 11, 12, 13]
    assert (expansion.batch_size, expansion.n_iter) == (3, 2)


def test_combinatorial_choose_n_is_ordered_picks():
    expansion = run("{2$$a|b|c}", options=COMBINATORIAL, batch_size=1, n_iter=1)
    assert expansion.all_prompts == ["a,b", "a,c", "b,a", "b,c", "c,a", "c,b"]


def test_max_generations_caps_and_batches_repeat():
    capped = run("{a|b|c} {x|y}", options=parse_args(args(is_combinatorial=True, max_generations=3)), n_iter=1)
    assert capped.all_prompts == ["a x", "a y", "b x"] and capped.all_seeds == [7, 8, 9]
    batched = run(
        "{a|b}",
        options=parse_args(args(is_combinatorial=True, combinatorial_batches=2, use_fixed_seed=True)),
        batch_size=2,
        n_iter=1,
    )
    assert batched.all_prompts == ["a", "b", "a", "b"]
    assert batched.all_seeds == [7, 7, 8, 8]  # fixed seed: one seed per combinatorial batch
    assert batched.n_iter == 2


def test_combinatorial_negative_with_syntax_is_a_cross_product():
    expansion = run("{a|b}", "{x|y}", options=COMBINATORIAL, n_iter=1)
    assert expansion.all_prompts == ["a", "a", "b", "b"]
    assert expansion.all_negative_prompts == ["x", "y", "x", "y"]


def test_too_many_combinations_is_refused():
    with pytest.raises(DynamicPromptsError, match="max_generations"):
        run("{a|b|c|d}{a|b|c|d}{a|b|c|d}", options=COMBINATORIAL, max_images=50)


# -- negative prompt ----------------------------------------------------------------------------------------------


def test_disable_negative_prompt_keeps_a_plain_negative():
    options = parse_args(args(disable_negative_prompt=True))
    expansion = run("{a|b} car", "ugly, blurry", options, n_iter=5)
    assert expansion.all_negative_prompts == ["ugly, blurry"] * 5


def test_negative_syntax_is_still_expanded_as_the_extension_does():
    # v2.17.0's "Don't apply to negative prompts" only keeps magic prompt and the like off the negative prompt.
    for disable in (True, False):
        expansion = run("car", "{ugly|blurry}", parse_args(args(disable_negative_prompt=disable)), n_iter=20)
        assert set(expansion.all_negative_prompts) == {"ugly", "blurry"}


# -- wildcards ----------------------------------------------------------------------------------------------------

WILDCARDS = {
    "colors": ["red", "blue", "green", "", "# a comment line", "blue"],
    "scenes/place": ["a {sunny|rainy} __colors__ street"],
}


def test_wildcards_expand_with_the_library_stream():
    expansion = run("__colors__ car", wildcards={"colors": ["red", "blue", "green"]}, n_iter=3, seed=3)
    assert expansion.all_prompts == ["blue car", "blue car", "red car"]  # library, seeds 3..5
    assert set(run("__colors__ car", wildcards=WILDCARDS, n_iter=40).all_prompts) == {
        "red car",
        "blue car",
        "green car",
    }


def test_nested_wildcards_and_variants_in_wildcard_lines_expand():
    prompts = run("__scenes/place__", wildcards=WILDCARDS, n_iter=60).all_prompts
    assert all(p.startswith("a ") and p.endswith(" street") for p in prompts)
    assert not any("__" in p or "{" in p for p in prompts)
    assert {p.split()[1] for p in prompts} == {"sunny", "rainy"}
    assert set(run("__scenes/*__", wildcards=WILDCARDS, n_iter=5).all_prompts) <= set(prompts) | {
        f"a {w} {c} street" for w in ("sunny", "rainy") for c in ("red", "blue", "green")
    }
    combos = run("__colors__", options=COMBINATORIAL, wildcards=WILDCARDS, n_iter=1).all_prompts
    assert combos == ["blue", "green", "red"]  # deduplicated and sorted, as the library's WildcardManager


def test_missing_wildcard_names_the_file():
    with pytest.raises(DynamicPromptsError, match=r"wildcard __colors__ is not available: upload colors\.txt"):
        run("a __colors__ car")
    with pytest.raises(ValueError, match=r"upload colors\.txt"):  # nested in another wildcard's line
        run("__scenes/place__", wildcards={"scenes/place": WILDCARDS["scenes/place"]})


def test_wildcards_named_and_uses_syntax():
    assert wildcards_named("a __colors__ {__dir/shapes__|x} __colors__") == ["colors", "dir/shapes"]
    assert wildcards_named("no wildcards here") == []
    assert uses_syntax("{a|b}") and uses_syntax("__colors__") and uses_syntax("{2$$a|b}")
    assert uses_syntax("/* the library drops this */ cat") and not uses_syntax("cat /* kept mid-text */")
    assert not uses_syntax("") and not uses_syntax("masterpiece, 1girl, (smile:1.1)")


# -- refused options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("named", "what"),
    [
        ({"is_magic_prompt": True, "magic_model": "Gustavosta/MagicPrompt-Stable-Diffusion"}, "magic prompt"),
        ({"is_feeling_lucky": True}, "I'm feeling lucky"),
        ({"is_attention_grabber": True}, "attention grabber"),
        ({"enable_jinja_templates": True}, "Jinja2 templates"),
        ({"no_image_generation": True}, "no_image_generation"),
    ],
)
def test_options_needing_models_or_templates_are_refused_by_name(named, what):
    with pytest.raises(DynamicPromptsError, match=what):
        run("a car", options=parse_args(args(**named)))


def test_magic_prompt_without_a_model_is_off_as_in_the_extension():
    assert run("a car", options=parse_args(args(is_magic_prompt=True, magic_model=""))).all_prompts == ["a car"] * 4


def test_unsupported_syntax_is_refused_by_name():
    with pytest.raises(DynamicPromptsError, match="cyclical"):
        run("{@a|b}")
    with pytest.raises(DynamicPromptsError, match="variables"):
        run("${color=red} a ${color} car")
