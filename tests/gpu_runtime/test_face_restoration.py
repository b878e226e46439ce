"""Face restoration (issue 14): ``restore_faces`` and extras' GFPGAN/CodeFormer visibilities run the uploaded
restorer on the faces facexlib finds, as A1111 v1.8.0 does.

The files are built offline (``gpu_runtime.tiny_faces``): the detector finds exactly one face of known size in
any image, the parser masks the whole face, and GFPGAN restores every face to one colour, so a test can tell which
restorer ran and where: restored pixels carry GFPGAN's colour, everything outside the pasted face is untouched.
Each restore runs 512 px networks on the CPU (about 10 s), so the tests share one engine and few restores.
"""

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("facexlib")
pytest.importorskip("spandrel_extra_arches")

from PIL import Image

from gpu_runtime.errors import JobError
from gpu_runtime.protocol import policy
from gpu_runtime.protocol.scripts import FACE_DETECTION_FILE, FACE_PARSING_FILE, named_models
from gpu_runtime.tiny_faces import GFPGAN_RGB
from tests.gpu_runtime.conftest import make_request, model, pixels

BASE = {"prompt": "a portrait", "seed": 4, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def faces(tiny_dir):
    from gpu_runtime.tiny_faces import write_tiny_detector, write_tiny_face_models

    write_tiny_face_models(tiny_dir / "faces")
    (tiny_dir / "nofaces").mkdir(exist_ok=True)
    write_tiny_detector(tiny_dir / "nofaces" / FACE_DETECTION_FILE, faces=False)
    return tiny_dir


@pytest.fixture(scope="module")
def face_engine(tmp_path_factory):
    from gpu_runtime.engine import Engine

    return Engine(tmp_path_factory.mktemp("face-runtime"), device="cpu", cache_bytes=4 * 10**9)


def with_faces(files, request, detector="faces", restorers=("GFPGANv1.4.pth", "codeformer-v0.1.0.pth")):
    """The files the control plane sends for face restoration: restorers and facexlib's helpers."""
    model(files, request, "GFPGAN", f"g-{detector}", FACE_DETECTION_FILE, f"{detector}/{FACE_DETECTION_FILE}")
    model(files, request, "GFPGAN", "g-parse", FACE_PARSING_FILE, f"faces/{FACE_PARSING_FILE}")
    for name in restorers:
        model_type = "GFPGAN" if "GFPGAN" in name else "Codeformer"
        model(files, request, model_type, f"r-{name}", name, f"faces/{name}")
    return request


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def source() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8))


def extras(engine, files, params, **kwargs):
    request = with_faces(files, make_request(files, "e", params, task="extra-single-image", types=()), **kwargs)
    output = engine.run([engine.prepare("e", request)])[0]
    return pixels(output["image"]), output["html_info"]


def gfpgan_coloured(image, region):
    """The share of ``region`` painted in GFPGAN's colour (the parser's soft mask edge may shift it by one)."""
    return (np.abs(image[region] - np.array(GFPGAN_RGB)).max(axis=1) <= 1).mean()


def test_restore_faces_runs_the_chosen_restorer_after_decoding(face_engine, files, faces):
    def txt2img(params):
        request = with_faces(files, make_request(files, "t", params, types=("Stable-diffusion",)))
        output = face_engine.run([face_engine.prepare("t", request)])[0]
        return pixels(output["images"][0]), json.loads(output["info"])

    plain, plain_info = txt2img(BASE)
    gfpgan, info = txt2img({**BASE, "restore_faces": True, "override_settings": {"face_restoration_model": "GFPGAN"}})
    face = (gfpgan != plain).any(axis=2)
    assert 0.05 < face.mean() < 0.9  # one face, inside the image
    assert gfpgan_coloured(gfpgan, face) > 0.9
    assert "Face restoration: GFPGAN, Size: 64x64" in info["infotexts"][0]
    assert info["restore_faces"] is True and "Face restoration" not in plain_info["infotexts"][0]

    codeformer, info = txt2img({**BASE, "restore_faces": True})  # A1111's default restorer
    changed = (codeformer != plain).any(axis=2)
    assert changed.mean() > 0.5 * face.mean() and not changed[~face].any()  # the same face, nothing else
    assert gfpgan_coloured(codeformer, face) < 0.1
    assert "Face restoration: CodeFormer" in info["infotexts"][0]


def test_extras_blend_each_restorer_by_its_visibility_and_pass_the_codeformer_weight(face_engine, files, faces):
    image = source()
    original = np.asarray(image).astype(int)
    full, info = extras(face_engine, files, {"image": b64(image), "gfpgan_visibility": 1})
    face = (full != original).any(axis=2)
    assert face.mean() > 0.05 and gfpgan_coloured(full, face) > 0.9
    assert info == "GFPGAN visibility: 1"
    half, _ = extras(face_engine, files, {"image": b64(image), "gfpgan_visibility": 0.5})
    expected = Image.blend(image, Image.fromarray(full.astype(np.uint8)), 0.5)
    assert np.array_equal(half, np.asarray(expected).astype(int))  # A1111's Image.blend, exactly

    params = {"image": b64(image), "codeformer_visibility": 1}
    fidelity, info = extras(face_engine, files, {**params, "codeformer_weight": 1})
    assert info == "CodeFormer visibility: 1, CodeFormer weight: 1"
    quality, _ = extras(face_engine, files, {**params, "codeformer_weight": 0})
    assert not (fidelity != original).any(axis=2)[~face].any()
    assert np.abs(fidelity - quality)[face].mean() > 1  # w reaches the network


def test_an_image_without_a_face_comes_back_unchanged(face_engine, files, faces):
    image = source()
    result, _ = extras(face_engine, files, {"image": b64(image), "gfpgan_visibility": 1}, detector="nofaces")
    assert np.array_equal(result, np.asarray(image).astype(int))


def test_refusals_name_the_missing_file_the_wrong_model_and_bad_values(face_engine, files, faces):
    params = {"image": b64(source()), "gfpgan_visibility": 1}
    request = make_request(files, "r", params, task="extra-single-image", types=())
    with pytest.raises(JobError, match="face restorer GFPGAN needs a checkpoint of type GFPGAN with a file"):
        face_engine.prepare("r", request)
    request = with_faces(files, make_request(files, "r", params, task="extra-single-image", types=()), restorers=())
    model(files, request, "GFPGAN", "r-fake", "GFPGANfake.pth", "4x-Tiny.pth")  # an upscaler under a GFPGAN name
    with pytest.raises(JobError, match=r"GFPGAN model GFPGANfake\.pth is a ESRGAN SR model, not one of: FaceSR"):
        face_engine.run([face_engine.prepare("r", request)])
    request = make_request(files, "r", {**params, "gfpgan_visibility": 2}, task="extra-single-image", types=())
    with pytest.raises(JobError, match="gfpgan_visibility must be between 0 and 1"):
        face_engine.prepare("r", request)
    for value in ("yes", 1):  # 1 is not true here: a value that would be silently read as "off" is refused
        request = make_request(files, "r", {**BASE, "restore_faces": value}, types=("Stable-diffusion",))
        with pytest.raises(JobError, match="restore_faces must be true or false"):
            face_engine.prepare("r", request)
    with pytest.raises(policy.PolicyError, match='face_restoration_model="RestoreFormer" is not supported'):
        policy.check("txt2img", {**BASE, "override_settings": {"face_restoration_model": "RestoreFormer"}})


def test_the_control_plane_sends_the_restorer_and_facexlibs_files():
    helpers = [FACE_DETECTION_FILE, FACE_PARSING_FILE]
    assert named_models("txt2img", {**BASE, "restore_faces": True}) == {"Codeformer": ["*.pth"], "GFPGAN": helpers}
    overrides = {"face_restoration": True, "face_restoration_model": "GFPGAN"}
    assert named_models("img2img", {"override_settings": overrides}) == {"GFPGAN": ["*GFPGAN*.pth", *helpers]}
    assert named_models("txt2img", {**BASE, "restore_faces": False, "override_settings": overrides}) == {}
    both = {"gfpgan_visibility": 0.3, "codeformer_visibility": 1}
    assert named_models("extra-single-image", both) == {"GFPGAN": ["*GFPGAN*.pth", *helpers], "Codeformer": ["*.pth"]}
    assert named_models("extra-batch-images", {"gfpgan_visibility": 0}) == {}
    axes = [30, "CodeFormer, no", [], 0, "", [], 0, "", []]
    plot = {"script_name": "x/y/z plot", "script_args": [*axes, True, False, False, False, 0, False]}
    assert named_models("txt2img", {**BASE, **plot}) == {"Codeformer": ["*.pth"], "GFPGAN": helpers}
