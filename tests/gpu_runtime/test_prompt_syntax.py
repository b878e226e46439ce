"""A1111's prompt syntax: emphasis, BREAK, comments, 75-token chunks (issue 12, part 1), on the tiny models."""

import re

import pytest

pytest.importorskip("diffusers")

import torch

from gpu_runtime.errors import JobError
from gpu_runtime.prompt_syntax import parse_attention, strip_comments
from tests.gpu_runtime.conftest import make_request, pixels

SMALL = {"seed": 5, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7}
LONG = ", ".join(f"word{i} thing" for i in range(40))  # well past 75 tokens


def image(engine, files, prompt, **changes):
    request = make_request(files, "p", {**SMALL, "prompt": prompt, **changes}, types=("Stable-diffusion",))
    return pixels(engine.run([engine.prepare("p", request)])[0]["images"][0])


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # A1111 v1.8.0 prompt_parser.parse_prompt_attention's documented results
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # inside brackets BREAK is a word
        ("", [("", 1.0)]),
    ],
)
def test_emphasis_is_parsed_as_a1111_parses_it(text, expected):
    assert parse_attention(text) == expected


def test_comments_are_stripped():
    assert strip_comments("a cat # a note\n# a whole line\nin a hat") == "a cat \nin a hat"


def test_chunks_have_bos_eos_and_break_and_comma_backtracking():
    from gpu_runtime.conditioning import chunk_text
    from gpu_runtime.families import clip_tokenizer

    tokenizer = clip_tokenizer()
    one = chunk_text("a cat", tokenizer)
    assert len(one.tokens) == 1 and len(one.tokens[0]) == 77 and one.tokens[0][0] == tokenizer.bos_token_id
    assert one.tokens[0][-1] == tokenizer.eos_token_id
    assert len(chunk_text("a cat BREAK a dog", tokenizer).tokens) == 2
    long = chunk_text(LONG, tokenizer)
    assert len(long.tokens) == 3 and all(len(ids) == 77 for ids in long.tokens)
    # one word, then 19 phrases of 4 tokens: the 75-token boundary falls inside the 19th phrase, so its words move
    # to the next chunk and the first ends on the 18th comma (A1111's comma back-off)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    backed_off = chunk_text("x " + "red big cat, " * 19, tokenizer)
    first = [t for t in backed_off.tokens[0] if t not in (tokenizer.bos_token_id, tokenizer.eos_token_id)]
    assert first[-1] == comma and len(first) == 73
    second = [t for t in backed_off.tokens[1] if t not in (tokenizer.bos_token_id, tokenizer.eos_token_id)]
    assert len(second) == 4
    weighted = chunk_text("a (cat:1.5)", tokenizer)
    assert weighted.weights[0][:4] == [1.0, 1.0, 1.5, 1.0]
    opened = chunk_text("a cat", clip_tokenizer("!"))  # OpenCLIP: zeros after the first EOS
    assert opened.tokens[0][3] == tokenizer.eos_token_id and set(opened.tokens[0][4:]) == {0}


def test_plain_prompts_encode_exactly_as_diffusers_does(engine, files):
    from gpu_runtime.conditioning import encode_sd

    image(engine, files, "warm up")
    pipe = next(iter(engine.pipelines.values())).pipe
    with torch.inference_mode():
        ours = encode_sd(pipe, "a photo of a cat")
        theirs = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    assert torch.equal(ours, theirs)


def test_weight_one_is_no_weight_and_a_weight_changes_the_image(engine, files):
    plain = image(engine, files, "a photo of a cat")
    assert (image(engine, files, "a photo of a (cat:1.0)") == plain).all()
    assert (image(engine, files, "a photo of a (cat:1.3)") != plain).any()
    assert (image(engine, files, "a photo of a (cat)") != plain).any()
    assert (image(engine, files, "a photo of a cat # with a comment") == plain).all()


def test_the_tail_of_a_long_prompt_changes_the_image(engine, files):
    head = image(engine, files, LONG)
    tail = image(engine, files, LONG + ", and a red balloon at the very end")
    assert (head != tail).any()  # nothing is truncated at 77 tokens


def test_break_changes_the_chunking_and_the_image(engine, files):
    joined = image(engine, files, "a photo of a cat in a hat")
    broken = image(engine, files, "a photo of a cat BREAK in a hat")
    assert (joined != broken).any()


def test_sdxl_long_weighted_prompts_run_on_both_encoders(engine, files):
    request = make_request(files, "x", {**SMALL, "prompt": LONG + ", (red:1.4)"}, checkpoint="xl.safetensors")
    output = engine.run([engine.prepare("x", request)])[0]
    assert pixels(output["images"][0]).std() > 0
    from gpu_runtime.conditioning import encode_sdxl

    pipe = next(v for k, v in engine.pipelines.items() if "xl" in k[0]).pipe
    with torch.inference_mode():
        embeds, pooled = encode_sdxl(pipe, LONG)
        plain, _ = encode_sdxl(pipe, "word0 thing")
    assert embeds.shape == (1, 3 * 77, 32 + 40) and pooled.shape == (1, 40)
    assert plain.shape == (1, 77, 72)


def test_cfg_zero_is_the_unconditional_prediction(engine, files):
    unconditional = image(engine, files, "a photo of a cat", negative_prompt="a dog", cfg_scale=0)
    assert (unconditional == image(engine, files, "a dog", cfg_scale=1)).all()
    with pytest.raises(JobError, match=r"cfg_scale=0\.5 is not supported"):
        image(engine, files, "a cat", cfg_scale=0.5)


def test_prompt_schedules_are_a1111s():
    from gpu_runtime.prompt_schedule import schedule, text_at

    # A1111 v1.8.0 prompt_parser.get_learned_conditioning_prompt_schedules' documented example
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]
    assert schedule("a [cat:dog:10] here", 20) == [(10, "a cat here"), (20, "a dog here")]  # absolute steps
    assert schedule("[a|b]", 4) == [(1, "a"), (2, "b"), (3, "a"), (4, "b")]
    assert [text_at(schedule("[a|b]", 4), call) for call in range(4)] == ["a", "a", "b", "a"]  # A1111's order
    assert schedule("(cat:1.2) [dog] \\[x:y:0.5\\]", 10) == [(10, "(cat:1.2) [dog] \\[x:y:0.5\\]")]
    assert schedule("a [cat:(dog:1.3):0.5]", 10) == [(5, "a cat"), (10, "a (dog:1.3)")]
    # the hires pass: fractions count from 1.0, absolute steps from the first pass's count
    assert schedule("[cat:dog:0.5]", 10, 1.0, 20) == [(10, "dog")]
    assert schedule("[cat:dog:25]", 10, 1.0, 20) == [(5, "cat"), (10, "dog")]


def test_prompt_editing_switches_the_embedding_half_way(engine, files):
    """``[cat:dog:0.5]`` at 10 steps: the UNet sees cat's conditioning for 6 calls and dog's for 4 (A1111)."""
    from gpu_runtime.conditioning import encode_sd

    image(engine, files, "warm up")
    pipe = next(iter(engine.pipelines.values())).pipe
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"][-1].clone()), with_kwargs=True
    )
    try:
        edited = image(engine, files, "a photo of a [cat:dog:0.5]", steps=10)
    finally:
        hook.remove()
    with torch.inference_mode():
        cat, dog = encode_sd(pipe, "a photo of a cat")[0], encode_sd(pipe, "a photo of a dog")[0]
    assert len(seen) == 10
    assert [torch.equal(z, cat) for z in seen] == [True] * 6 + [False] * 4
    assert all(torch.equal(z, dog) for z in seen[6:])
    assert (edited != image(engine, files, "a photo of a cat", steps=10)).any()
    assert (edited != image(engine, files, "a photo of a dog", steps=10)).any()


def test_alternation_changes_the_image_and_and_is_refused(engine, files):
    assert (image(engine, files, "a [cat|dog]") != image(engine, files, "a cat")).any()
    with pytest.raises(JobError, match=re.escape("AND (composable diffusion) is not supported")):
        image(engine, files, "a cat AND a dog")
    assert image(engine, files, "a \\[cat:dog\\] sign").std() > 0  # escaped brackets are text
