"""The console in a real browser (Playwright driving Debian's Chromium) against the live test server.

Every request the page makes to a non-loopback address is blocked and counted: no page may need the internet.
Each test leaves screenshots under ``test-artifacts/``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"),
    pytest.mark.django_db(transaction=True),
]
# Playwright's sync API runs an event loop in this thread; the test's own ORM calls are still synchronous.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(scope="session")
def browser_type_launch_args():
    return {
        "executable_path": CHROMIUM,
        "args": [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-dev-shm-usage",
        ],
    }


@pytest.fixture
def offline_page(browser, live_server):
    """A page whose every request to anything but the live server's loopback address is refused."""
    context = browser.new_context(viewport={"width": 1366, "height": 860}, accept_downloads=True)
    blocked: list[str] = []

    def guard(route):
        host = urlparse(route.request.url).hostname or ""
        if host in ("localhost", "127.0.0.1", "::1") or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.blocked = blocked
    yield page
    context.close()
    assert blocked == [], f"pages tried to reach the internet: {blocked}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page, base: str, username: str, password: str) -> None:
    page.goto(f"{base}/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button.primary")
    page.wait_for_url(f"{base}/")


def test_operator_journey(offline_page, live_server, local_store, worker, gpu, settings, tmp_path):
    """Sign in, upload the tiny model through the part URLs, deploy an endpoint, generate, see the gallery, issue a
    key that is shown once."""
    pytest.importorskip("diffusers")
    from apps.endpoints.models import Endpoint
    from gpu_runtime.tiny import write_tiny_model
    from tests.conftest import make_user

    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    make_user("op", roles=("IT Operator",), password="op-password-1", is_staff=True)
    page, base = offline_page, live_server.url
    sign_in(page, base, "op", "op-password-1")
    shot(page, "01-dashboard")

    model = write_tiny_model(tmp_path / "tiny.safetensors")
    page.goto(f"{base}/models/")
    page.set_input_files("#upload-file", str(model))
    page.select_option("#upload-type", "Stable-diffusion")
    page.click("#upload-start")
    page.wait_for_function(
        "document.querySelector('#upload-status').textContent.trim().endsWith('Uploaded')", timeout=60_000
    )
    page.goto(f"{base}/models/")
    row = page.locator("tr", has_text="tiny.safetensors")
    assert "Active" in row.inner_text()
    shot(page, "02-models")

    page.goto(f"{base}/endpoints/")
    form = page.locator("#deploy-form")
    form.locator("[name=endpoint_name]").fill("web")
    form.locator("[name=endpoint_type]").select_option("Async")
    form.locator("[name=instance_type]").fill("cpu")
    page.click("#deploy-submit")
    page.wait_for_selector('[data-endpoint="esd-async-web"]')
    gpu("esd-async-web")  # the GPU host for this endpoint (the same code `python -m gpu_runtime worker` runs)
    page.wait_for_function(
        "document.querySelector('[data-endpoint=\"esd-async-web\"] .endpoint-status')?.textContent.includes('InService')",
        timeout=60_000,
    )
    assert Endpoint.objects.get(name="esd-async-web").status == "InService"
    shot(page, "03-endpoints")

    page.goto(f"{base}/generate/")
    form = page.locator("#generate-form")
    form.locator("[name=prompt]").fill("a photo of a cat")
    form.locator("[name=steps]").fill("3")
    form.locator("[name=width]").fill("64")
    form.locator("[name=height]").fill("64")
    form.locator("[name=seed]").fill("5")
    page.click("#generate-submit")
    page.wait_for_function("document.querySelector('#job-status')?.textContent.includes('succeed')", timeout=90_000)
    image = page.locator("img.result").first
    image.wait_for()
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert page.evaluate("(img) => img.naturalWidth", image.element_handle()) == 64
    job_url = page.url
    shot(page, "04-job")

    page.goto(f"{base}/gallery/")
    job_id = re.search(r"/jobs/([0-9a-f-]+)/", job_url).group(1)
    page.wait_for_selector(f'figure.gallery-item[data-job="{job_id}"]')
    shot(page, "05-gallery")

    page.goto(f"{base}/keys/")
    page.locator("#key-form [name=name]").fill("laptop")
    page.click("#key-submit")
    key = page.locator("#new-key").inner_text().strip()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", key)
    shot(page, "06-key-once")
    page.goto(f"{base}/keys/")
    assert key not in page.content()
    assert page.locator("#new-key").count() == 0


def test_designer_without_user_all_does_not_see_users(offline_page, live_server):
    from tests.conftest import make_role, make_user

    make_role("Designer", ["inference:create", "checkpoint:list", "train:all"])
    make_user("dee", roles=("Designer",), password="dee-password-1")
    page, base = offline_page, live_server.url
    sign_in(page, base, "dee", "dee-password-1")
    menu = page.locator("nav.menu").inner_text()
    assert "Generate" in menu and "Users" not in menu and "Roles" not in menu
    response = page.goto(f"{base}/users/")
    assert response.status == 403
    shot(page, "07-designer-forbidden")


def test_designer_draws_an_inpainting_mask_on_the_input_image(offline_page, live_server, disk_store, tmp_path):
    """The Generate page's mask painter: strokes on the chosen input image become the job's black-and-white mask,
    at the image's own size, white where painted."""
    import base64
    import io
    import json

    from PIL import Image

    from apps.inference.models import InferenceJob
    from tests.conftest import make_user
    from tests.inference.test_inference_api import endpoint
    from tests.models_registry.test_checkpoints import register

    register("tiny.safetensors")
    endpoint("esd-async-a")
    make_user("ann", roles=("IT Operator",), password="ann-password-1", is_staff=True)
    source = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (40, 90, 160)).save(source)
    page, base = offline_page, live_server.url
    sign_in(page, base, "ann", "ann-password-1")
    page.goto(f"{base}/generate/")
    page.select_option("[name=task_type]", "img2img")
    page.set_input_files("[name=init_image]", str(source))
    canvas = page.locator("#mask-canvas")
    canvas.wait_for(state="visible")
    page.fill("#mask-brush", "16")
    box = canvas.bounding_box()
    # one stroke across the middle of the image's left half
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    shot(page, "08-mask-drawn")
    page.fill("[name=steps]", "3")
    page.click("#generate-submit")
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f-]+/$"))
    payload = json.loads(InferenceJob.objects.get().payload_string)
    mask = Image.open(io.BytesIO(base64.b64decode(payload["mask"]))).convert("L")
    assert mask.size == (96, 64)
    assert mask.getpixel((24, 32)) == 255 and mask.getpixel((90, 5)) == 0 and mask.getpixel((24, 5)) == 0
