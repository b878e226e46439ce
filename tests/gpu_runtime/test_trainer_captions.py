"""Captions as kohya's train_network.py uses them, on the tiny models (CPU, bit-exact): ``max_token_length`` chunks
and their re-join (SD and SDXL), caption dropout, tag dropout and kept tags, wildcards and weighted captions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from gpu_runtime.trainer import TrainingConfig, TrainingError, _load_model, captions, train
from gpu_runtime.trainer.captions import parse_weights, process_caption, tokenize

BASE = {
    "output_name": "out",
    "save_model_as": "safetensors",
    "max_train_epochs": 1,
    "train_batch_size": 2,
    "resolution": "64,64",
    "seed": 7,
    "caption_extension": ".txt",
    "learning_rate": 1e-2,
    "network_dim": 4,
    "network_alpha": 2,
    "cache_latents": True,
}
# 30 tags ("tag", its digits, ","): 109 tokens, so whatever follows them lies past the first 75-token window
LONG = ", ".join(f"tag{i}" for i in range(30))
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from gpu_runtime.tiny import write_tiny_model, write_tiny_sdxl_model

    base = tmp_path_factory.mktemp("captions")
    (base / "work").mkdir()
    return {
        "sd": write_tiny_model(base / "tiny.safetensors", seed=0),
        "xl": write_tiny_sdxl_model(base / "xl.safetensors"),
        "work": base / "work",
    }


def dataset(path: Path, texts: list[str], repeats: int = 1) -> Path:
    """The same random 64x64 images whatever the captions (``texts``, one per image, in file order)."""
    folder = path / f"{repeats}_set"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i, text in enumerate(texts):
        Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(text + "\n")
    return path


def run(models, tmp_path: Path, data: Path, name: str, model: str = "sd", **options) -> Path:
    config = tmp_path / f"{name}.toml"
    values = {k: v for k, v in {**BASE, **options}.items() if v is not None}
    config.write_text("\n".join(["[training_arguments]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]))
    result = train(config, models[model], data, tmp_path / name, device="cpu", work_dir=models["work"])
    return result.files[-1]


def same_lora(a: Path, b: Path) -> bool:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    return all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture
def encoded(monkeypatch) -> list[list[str]]:
    """Every batch of captions the text encoders are given during training, in step order."""
    seen: list[list[str]] = []
    original = captions._Encoder.__call__

    def record(self, texts: list[str]):
        seen.append(list(texts))
        return original(self, texts)

    monkeypatch.setattr(captions._Encoder, "__call__", record)
    return seen


def encoder_for(models, model: str, **options) -> captions._Encoder:
    loaded = _load_model(models[model], models["work"] / "configs", "cpu", torch.float32)
    return captions._Encoder(loaded, TrainingConfig.from_dict(options), "cpu", [])


# --- max_token_length ---------------------------------------------------------------------------------------------


def test_max_token_length_225_encodes_three_chunks_rejoined_like_kohya(models):
    encode = encoder_for(models, "sd", max_token_length=225)
    tokenizer, text_encoder = encode.model.tokenizers[0], encode.model.text_encoders[0]
    full = tokenizer(f"{LONG}, red").input_ids  # BOS, 91 tokens, EOS
    ids, weights = encode.tokens(tokenizer, [f"{LONG}, red"])
    assert ids.shape == (1, 3, 77) and torch.equal(weights, torch.ones(1, 3, 77))
    padded = full + [EOS] * (227 - len(full))  # SD 1 pads with EOS
    for chunk in range(3):  # BOS, the chunk's 75 tokens, EOS
        assert ids[0, chunk].tolist() == [BOS, *padded[1 + 75 * chunk : 76 + 75 * chunk], EOS]
    with torch.no_grad():
        hidden, pooled = encode([f"{LONG}, red"])
        states = text_encoder(ids[0]).last_hidden_state  # the three chunks, encoded as one batch
    assert pooled is None and hidden.shape == (1, 227, 32)  # 3 x 75 + BOS + EOS
    expected = torch.cat([states[0, :1], states[0, 1:76], states[1, 1:76], states[2, 1:76], states[2, 76:]])
    assert torch.equal(hidden[0], expected)

    with torch.no_grad():  # tokens past the first window change the encoding with 225 ...
        other, _ = encode([f"{LONG}, blue"])
    assert torch.equal(other[:, :76], hidden[:, :76]) and not torch.equal(other[:, 76:], hidden[:, 76:])
    for short in (75, None):  # ... and are cut with 75 (kohya's default), as without max_token_length
        encode = encoder_for(models, "sd", max_token_length=short)
        with torch.no_grad():
            red, _ = encode([f"{LONG}, red"])
            blue, _ = encode([f"{LONG}, blue"])
        assert red.shape == (1, 77, 32) and torch.equal(red, blue)
        assert torch.equal(red[:, 1:76], hidden[:, 1:76])  # the first chunk is the 75-token encoding
    assert torch.equal(encode.tokens(tokenizer, [f"{LONG}, red"])[0][0, 0], ids[0, 0])

    encode = encoder_for(models, "sd", max_token_length=150, clip_skip=2)
    with torch.no_grad():
        hidden, _ = encode([f"{LONG}, red"])
        layer = text_encoder(ids[0, :2], output_hidden_states=True).hidden_states[-2]
        states = captions._final_norm(text_encoder)(layer)
    assert hidden.shape == (1, 152, 32)
    assert torch.equal(hidden[0], torch.cat([states[0, :1], states[0, 1:76], states[1, 1:76], states[1, 76:]]))

    for wrong in (100, 300):  # kohya's choices are 150 and 225 (75 is its default)
        with pytest.raises(TrainingError, match="max_token_length must be 75, 150 or 225"):
            TrainingConfig.from_dict({"max_token_length": wrong})


def test_sdxl_chunks_pad_like_kohya_and_pool_the_first_chunk(models):
    encode = encoder_for(models, "xl", max_token_length=225)
    first, second = encode.model.tokenizers
    assert second.pad_token_id == 0 != second.eos_token_id  # SDXL's second tokenizer pads with "!"
    caption = f"{LONG}, red"
    full = second(caption).input_ids
    ids, _ = encode.tokens(second, [caption])
    inner = full[1:-1]
    # chunk 1 ends inside the text: its last token becomes EOS; chunk 2 holds the rest, EOS, pads;
    # chunk 3 is empty: BOS EOS pad ... (kohya's get_input_ids for pad != EOS)
    assert ids[0, 0].tolist() == [BOS, *inner[:75], EOS]
    assert ids[0, 1].tolist() == [BOS, *inner[75:], EOS, *[0] * (75 - len(inner[75:]) - 1), 0]
    assert ids[0, 2].tolist() == [BOS, EOS, *[0] * 75]
    assert encode.tokens(first, [caption])[0][0, 2].tolist() == [BOS, *[EOS] * 76]

    with torch.no_grad():
        hidden, pooled = encode([caption, "a cat"])
        te1, te2 = encode.model.text_encoders
        flat = encode.tokens(second, [caption, "a cat"])[0].reshape(6, 77)
        out2 = te2(flat, output_hidden_states=True)
        out1 = te1(encode.tokens(first, [caption, "a cat"])[0].reshape(6, 77), output_hidden_states=True)
    assert hidden.shape == (2, 227, 72) and pooled.shape == (2, 40)
    joined = [
        torch.cat([s[3 * b, :1], s[3 * b, 1:76], s[3 * b + 1, 1:76], s[3 * b + 2, 1:76], s[3 * b + 2, 76:]])
        for s in (out1.hidden_states[-2], out2.hidden_states[-2])
        for b in range(2)
    ]
    assert torch.equal(hidden[0], torch.cat([joined[0], joined[2]], dim=-1))
    assert torch.equal(hidden[1], torch.cat([joined[1], joined[3]], dim=-1))
    # pooled: the projected state at the first EOS of each caption's first chunk (kohya's pool_workaround)
    eos_at = [int((row == EOS).nonzero()[0]) for row in flat]
    assert eos_at[0] == 76 and eos_at[3] == 3
    projected = te2.text_projection(out2.last_hidden_state[range(6), eos_at])
    assert torch.equal(pooled, projected[[0, 3]])


def test_tokens_past_75_train_only_with_max_token_length_225(models, tmp_path):
    red = dataset(tmp_path / "red", [f"{LONG}, red", f"{LONG}, red, green"])
    blue = dataset(tmp_path / "blue", [f"{LONG}, blue", f"{LONG}, blue, green"])
    short = [run(models, tmp_path, data, f"short-{data.name}", max_token_length=75) for data in (red, blue)]
    long = [run(models, tmp_path, data, f"long-{data.name}", max_token_length=225) for data in (red, blue)]
    assert same_lora(*short)  # the captions differ only past token 75: cut away
    assert not same_lora(*long)
    with safe_open(str(long[0]), "pt") as handle:
        assert handle.metadata()["ss_max_token_length"] == "225"


# --- caption dropout, tags --------------------------------------------------------------------------------------


def test_caption_dropout_rate_one_trains_exactly_as_empty_captions(models, tmp_path, encoded):
    texts = ["a photo of a cat, red", "a photo of a dog, blue"]
    captioned = dataset(tmp_path / "captioned", texts)
    empty = dataset(tmp_path / "empty", ["", ""])
    dropped = run(models, tmp_path, captioned, "dropped", caption_dropout_rate=1.0)
    assert encoded == [["", ""]]
    assert same_lora(dropped, run(models, tmp_path, empty, "empty"))
    assert not same_lora(dropped, run(models, tmp_path, captioned, "kept"))  # the captions did matter
    with safe_open(str(dropped), "pt") as handle:
        assert handle.metadata()["ss_caption_dropout_rate"] == "1.0"


def test_caption_dropout_every_n_epochs_drops_on_those_epochs(models, tmp_path, encoded):
    texts = ["a photo of a cat", "a photo of a dog"]
    data = dataset(tmp_path / "data", texts)
    progress: list[dict] = []
    config = tmp_path / "every.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**BASE, "max_train_epochs": 4}.items()]
    config.write_text("\n".join(["[training]", *lines, "caption_dropout_every_n_epochs = 2"]) + "\n")
    train(
        config, models["sd"], data, tmp_path / "out", device="cpu", work_dir=models["work"], on_progress=progress.append
    )
    epochs = [p["epoch"] for p in progress]
    assert epochs == [1, 2, 3, 4]  # one step per epoch
    assert [sorted(batch) for batch in encoded] == [texts, ["", ""], texts, ["", ""]]


def test_caption_tag_dropout_rate_one_keeps_only_the_kept_tags(models, tmp_path, encoded):
    data = dataset(tmp_path / "tags", ["a photo of a cat, red, fluffy", "a photo of a dog, blue, small"])
    reference = dataset(tmp_path / "heads", ["a photo of a cat", "a photo of a dog"])
    dropped = run(models, tmp_path, data, "dropped", keep_tokens=1, caption_tag_dropout_rate=1.0)
    assert sorted(encoded[0]) == ["a photo of a cat", "a photo of a dog"]
    assert same_lora(dropped, run(models, tmp_path, reference, "heads"))


def test_keep_tokens_separator_keeps_the_head_and_tail_and_shuffles_the_rest(models, tmp_path, encoded):
    middle = ["red", "blue", "green", "yellow", "pink"]
    text = f"masterpiece, cat ||| {', '.join(middle)} ||| signature"
    data = dataset(tmp_path / "sep", [text] * 4, repeats=2)
    run(
        models,
        tmp_path,
        data,
        "sep",
        shuffle_caption=True,
        keep_tokens=4,
        keep_tokens_separator="|||",
        train_batch_size=4,
    )
    seen = [caption for batch in encoded for caption in batch]
    assert len(seen) == 8
    orders = set()
    for caption in seen:
        tags = caption.split(", ")
        assert tags[:2] == ["masterpiece", "cat"] and tags[-1] == "signature"  # the separator wins over keep_tokens
        assert sorted(tags[2:-1]) == sorted(middle)
        orders.add(tuple(tags[2:-1]))
    assert len(orders) > 1

    # without the separator in a caption, keep_tokens applies; without shuffling the caption is left as it is
    config = TrainingConfig.from_dict({"shuffle_caption": True, "keep_tokens": 2, "keep_tokens_separator": "|||"})
    shuffled = process_caption("a, b, c, d, e, f", config, random.Random(0), 1)
    assert shuffled.startswith("a, b, ") and sorted(shuffled.split(", ")[2:]) == ["c", "d", "e", "f"]
    assert process_caption(text, TrainingConfig.from_dict({}), random.Random(0), 1) == text


def test_prefix_suffix_wildcards_and_secondary_separator_in_kohyas_order(tmp_path):
    config = TrainingConfig.from_dict(
        {
            "caption_prefix": "pre",
            "caption_suffix": "post",
            "enable_wildcard": True,
            "secondary_separator": ";;;",
            "shuffle_caption": True,
            "keep_tokens": 1,
        }
    )
    rng = random.Random(3)
    seen = {process_caption("a {red|blue} cat, b;;;c, {{x}}\nsecond {one|two}", config, rng, 1) for _ in range(40)}
    # one line per step; the prefix belongs to the first line, the suffix to the last (kohya adds them first);
    # "b;;;c" is one tag while shuffling and only then becomes "b,c"; {{x}} is a literal {x}
    assert seen == {
        "pre a red cat, b,c, {x}",
        "pre a blue cat, b,c, {x}",
        "pre a red cat, {x}, b,c",
        "pre a blue cat, {x}, b,c",
        "second one post",
        "second two post",
    }
    plain = TrainingConfig.from_dict({"caption_prefix": "pre", "shuffle_caption": True})
    assert sorted(process_caption("a,, b", plain, random.Random(0), 1).split(", ")) == ["", "b", "pre a"]  # kept

    (tmp_path / "1_x").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "1_x" / "a.png")
    (tmp_path / "1_x" / "a.txt").write_text("first {a|b}\n\nsecond\n")
    from gpu_runtime.trainer import load_dataset

    wild = TrainingConfig.from_dict({"caption_extension": ".txt", "resolution": 64, "enable_wildcard": True})
    assert load_dataset(tmp_path, wild)[0].caption == "first {a|b}\nsecond"  # all lines, for a choice per step
    flat = TrainingConfig.from_dict({"caption_extension": ".txt", "resolution": 64})
    assert load_dataset(tmp_path, flat)[0].caption == "first {a|b}"


# --- weighted captions ------------------------------------------------------------------------------------------


def test_weighted_captions_scale_each_tokens_state_like_kohya(models):
    assert parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.3 * 1.1 * 1.1),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.1 * 1.1 * 1.1 * 1.1),
        (".", 1.1),
    ]
    assert parse_weights(r"\(literal\] (open") == [("(literal] ", 1.0), ("open", 1.1)]
    with pytest.raises(TrainingError, match="weighted_captions"):
        parse_weights("(cat:1.2.3)")

    weighted = encoder_for(models, "sd", weighted_captions=True, max_token_length=150)
    plain = encoder_for(models, "sd", max_token_length=150)
    tokenizer = plain.model.tokenizers[0]
    text = f"{LONG}, (red:1.5) [cat]"
    ids, weights = weighted.tokens(tokenizer, [text])
    assert torch.equal(ids, plain.tokens(tokenizer, [f"{LONG}, red cat"])[0])  # brackets are syntax, not tokens
    red = len(tokenizer(f"{LONG},").input_ids) - 1  # the position of "red" after BOS: past the first chunk
    assert red > 76
    scale = torch.ones(152)
    scale[red], scale[red + 1] = 1.5, 1 / 1.1
    assert torch.equal(torch.cat([weights[0, 0, :76], weights[0, 1, 1:]]), scale)
    with torch.no_grad():
        expected = plain([f"{LONG}, red cat"])[0] * scale[None, :, None]
        assert torch.equal(weighted([text])[0], expected)
        assert torch.equal(weighted([LONG])[0], plain([LONG])[0])  # no brackets: kohya's plain encoding
    assert tokenize(tokenizer, "(cat)", None, weighted=True)[1][0, :3].tolist() == [1.0, pytest.approx(1.1), 1.0]


def test_weighted_captions_train_sdxl_with_long_captions(models, tmp_path):
    data = dataset(tmp_path / "data", [f"{LONG}, red", f"{LONG}, blue"])
    options = {"max_token_length": 150, "max_train_epochs": None, "max_train_steps": 1}
    plain = run(models, tmp_path, data, "plain", "xl", caption_prefix="best", **options)
    unweighted = run(models, tmp_path, data, "w1", "xl", caption_prefix="best", weighted_captions=True, **options)
    weighted = run(models, tmp_path, data, "w2", "xl", caption_prefix="(best:1.3)", weighted_captions=True, **options)
    assert same_lora(plain, unweighted)  # weights of 1 are kohya's plain encoding
    assert not same_lora(plain, weighted)  # the same tokens, one of them weighted
