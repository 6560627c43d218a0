"""The static web export: the compressed GEM read back in Python, the exported folder, and the page
driven in headless Chromium (Debian's chromium through playwright; WebGL2 through SwiftShader), compared
with the Python CPU render of the same compressed GEM, coefficients, pose and camera.

The browser tests are skipped only where /usr/bin/chromium is missing (CI installs it in .ci/run).
"""
import base64
import contextlib
import functools
import gzip
import http.server
import io
import json
import math
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from lib.config import load_config
from lib.models.gem import ATTRIBUTES, render_gem
from lib.paths import REPO_ROOT, ActorPaths
from lib.viewer.compressed import (JS_PREFIX, component_bits, compress, dequantise_rows, encode_gem, gzipped,
                                   kept_components, load_compressed, pack, quantise_rows, read_container,
                                   save_compressed, write_js)
from lib.viewer.web_export import export_web, write_web_export

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
QUIET = lambda *a, **k: None  # noqa: E731
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason="/usr/bin/chromium not installed (apt-get install chromium; .ci/run does)")


# ---------------------------------------------------------------- compressed bases

def test_compressed_gem_reads_back_close_to_the_original(head_gem, tmp_path):
    path = save_compressed(head_gem, tmp_path / "gem.gemw", energy=1.0, bits=8, min_bits=8)
    model = load_compressed(path)
    assert path.stat().st_size < head_gem.nbytes() / 2
    for attr in ATTRIBUTES:
        assert model.n_components(attr) == head_gem.n_components(attr)
        assert torch.allclose(model.coefficients[attr], head_gem.coefficients[attr])
    c = {a: v[3:4] for a, v in head_gem.coefficients.items()}
    a, b = head_gem.reconstruct(c), model.reconstruct(c)
    assert (a.means - b.means).abs().max() < 2e-4  # metres, on a head 20 cm wide
    assert (a.colors - b.colors).abs().max() <= 0.5 / 255 + 1e-6
    coarser = load_compressed(save_compressed(head_gem, tmp_path / "gem4.gemw", energy=1.0, bits=4, min_bits=4))
    assert (coarser.reconstruct(c).means - a.means).abs().max() > (b.means - a.means).abs().max() * 4
    smaller = save_compressed(head_gem, tmp_path / "gem82.gemw", energy=1.0, bits=8, min_bits=2)
    assert gzip.compress(smaller.read_bytes()).__len__() < gzip.compress(path.read_bytes()).__len__()


def test_bits_follow_each_components_reach():
    reach = np.array([4.0, 2.0, 1.0, 0.3, 4 / 256, 0.0])
    assert component_bits(reach, 8, 2).tolist() == [8, 7, 6, 4, 2, 2]
    assert component_bits(reach, 6, 1).tolist() == [6, 5, 4, 2, 1, 1]


def test_quantised_rows_keep_zero_exact_and_err_by_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 1000)) * np.array([[1.0], [0.1], [3.0], [0.01]])
    x[:, :10] = 0.0
    bits = np.array([8, 5, 3, 2])
    q, scale, zero = quantise_rows(x, bits)
    assert q.dtype == np.uint8 and (q.max(1) <= (1 << bits) - 1).all()
    back = dequantise_rows(q, scale, zero).numpy()
    assert (back[:, :10] == 0).all()  # a part's basis stays zero outside the part
    steps = (np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0)) / ((1 << bits) - 1)
    assert (np.abs(back - x).max(1) <= 0.5 * steps * (1 + 1e-5) + 1e-7).all()
    assert np.abs(back - x).max(1)[0] < np.abs(back - x).max(1)[2]  # fewer bits, coarser


def test_the_header_records_the_bits_the_bytes_use(head_gem):
    meta, arrays = encode_gem(head_gem, energy=1.0, bits=8, min_bits=3)
    spent = []
    for attr in ATTRIBUTES:
        for i, b in enumerate(meta["attributes"][attr]["blocks"]):
            block = head_gem.blocks[attr][i]
            reach = block.eigenvalues.sqrt().numpy() * np.ptp(block.basis.numpy(), 1)
            q, bits = arrays[f"{attr}.{i}.basis"], np.array(b["basis_bits"])
            assert bits.tolist() == component_bits(reach, 8, 3).tolist() and bits.max() == 8
            assert (q.max(1) < (1 << bits)).all() and (q.max(1) >= (1 << (bits - 1))).all()
            spent += bits.tolist()
    assert min(spent) < 8  # some component with less reach got fewer bits


def test_gem_js_is_base85_and_reads_back_exactly(head_gem, tmp_path):
    meta, arrays = encode_gem(head_gem)
    buffer = gzipped(pack(meta, arrays))
    text = write_js(tmp_path / "gem.js", buffer).read_text()
    assert text.startswith(JS_PREFIX) and len(text) < len(buffer) * 1.26 + 40
    meta2, arrays2 = read_container(tmp_path / "gem.js")
    assert meta2 == json.loads(json.dumps(meta)) and all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)


def test_components_are_dropped_by_explained_energy(head_gem):
    lam = torch.tensor([8.0, 1.0, 0.5, 0.5])
    assert [kept_components(lam, e) for e in (0.5, 0.8, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 4]
    small = compress(head_gem, energy=0.5)
    kept = {a: kept_components(head_gem.blocks[a][0].eigenvalues, 0.5) for a in ATTRIBUTES}
    assert {a: small.n_components(a) for a in ATTRIBUTES} == kept
    assert sum(kept.values()) < sum(head_gem.n_components(a) for a in ATTRIBUTES)
    for a in ATTRIBUTES:  # the kept components' coefficients, unchanged
        assert torch.equal(small.coefficients[a], head_gem.coefficients[a][:, :kept[a]])


# ---------------------------------------------------------------- the export of an actor

@pytest.fixture(scope="module")
def tiny_gem_config(tiny_actor_config, tmp_path_factory):
    """The tiny actor's regressor and GEM (a few steps), in this module's experiments folder.
    -> (config path, overrides)"""
    from lib.train import trainer
    from lib.train.fit_gem import fit_gem

    experiments = tmp_path_factory.mktemp("web_export") / "experiments"
    overrides = [f"actor.experiments_dir={os.path.relpath(experiments, REPO_ROOT)}", "gem.evaluate=false"]
    shutil.copytree(ActorPaths(load_config(tiny_actor_config)).stage_dir("mesh_pca"),
                    ActorPaths(load_config(tiny_actor_config, overrides)).stage_dir("mesh_pca"))
    cfg = load_config(tiny_actor_config, overrides + ["train.stage=regressor"])
    trainer.train(cfg, log=QUIET)
    fit_gem(cfg, log=QUIET)
    return str(tiny_actor_config), overrides


@pytest.fixture(scope="module")
def tiny_export(tiny_gem_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_web")
    # a cross-identity reenactment as test.py TARGET SOURCE leaves it: its track file
    from lib.atomic import save_torch
    from lib.models.gem import GaussianEigenModel

    cfg = load_config(*tiny_gem_config)
    model = GaussianEigenModel.load(ActorPaths(cfg).gem)
    T = model.coefficients["positions"].shape[0]
    save_torch(ActorPaths(cfg).reenactment("other") / "track.pt",
               {"coefficients": {a: -c for a, c in model.coefficients.items()}, "R": torch.eye(3).expand(T, 3, 3),
                "t": torch.zeros(T, 3), "timesteps": torch.arange(T)})
    sizes = export_web(cfg, out, log=QUIET)
    return out, sizes


def test_export_writes_a_static_folder_python_reads_back(tiny_export):
    out, sizes = tiny_export
    assert sorted(p.name for p in out.iterdir()) == ["gem.js", "gem_player.js", "index.html"]
    html = (out / "index.html").read_text() + (out / "gem_player.js").read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched from anywhere
    meta, arrays = read_container(out)
    assert [t["name"] for t in meta["tracks"]] == ["fitted", "reenact_other"]
    model = load_compressed(out)
    T = int(model.timesteps.shape[0])
    flat = arrays["track.0.coefficients"]
    assert flat.shape == (T, sum(model.n_components(a) for a in ATTRIBUTES))
    assert np.allclose(flat[:, :model.n_components("positions")], model.coefficients["positions"].numpy())
    assert np.allclose(arrays["track.1.coefficients"], -flat)
    assert arrays["track.0.R"].shape == (T, 3, 3) and sizes["total"] == sum(p.stat().st_size for p in out.iterdir())


def test_the_command_line_writes_the_export(tiny_gem_config, tmp_path):
    from lib.models.gem import GaussianEigenModel

    config, overrides = tiny_gem_config
    out = tmp_path / "web"
    done = subprocess.run([sys.executable, "pca_viewer.py", config, "--export-web", str(out), *overrides],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "web export ->" in done.stdout
    gem = GaussianEigenModel.load(ActorPaths(load_config(config, overrides)).gem)
    assert load_compressed(out).n_gaussians == gem.n_gaussians


# ---------------------------------------------------------------- the page in headless Chromium

@contextlib.contextmanager
def static_server(folder):
    """A plain static HTTP server of folder on a free local port. -> its URL"""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def open_page(browser, location, scale: float, where: str = "auto"):
    """The export at location: a folder (opened from disk, file://: no server at all) or a URL; where: the
    page's ?eval= (where the GEM is evaluated: auto, cpu or gpu)."""
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    url = location if str(location).startswith("http") else f"file://{location}"
    page.goto(f"{url}/index.html?scale={scale}&eval={where}")
    page.wait_for_function("document.body.dataset.ready", timeout=30_000)
    assert page.evaluate("document.body.dataset.ready") == "true", (errors, page.text_content("#error"))
    return page


def capture(page) -> tuple[np.ndarray, dict]:
    """The page's composited float image [H, W, 3] of its current state, and that state."""
    state = page.evaluate("""() => { const g = GEM; g.render();
        return {image: g.captureBase64(), width: g.width, height: g.height, K: g.K, view: Array.from(g.gemView()),
                coefficients: Array.from(g.coefficients)}; }""")
    image = np.frombuffer(base64.b64decode(state["image"]), np.float32).reshape(state["height"], state["width"], 4)
    return image[..., :3], state


def cpu_render(model, state, background):
    """render_gem of the page's state: its coefficients, and its GEM-space camera (pose folded in)."""
    flat = torch.tensor(state["coefficients"])[None]
    coefficients = dict(zip(ATTRIBUTES, flat.split([model.n_components(a) for a in ATTRIBUTES], -1)))
    viewmat = torch.tensor(state["view"], dtype=torch.float64).reshape(1, 4, 4).float()
    fx, fy, cx, cy = state["K"]
    K = torch.tensor([[[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]])
    with torch.no_grad():
        out = render_gem(model, coefficients, torch.eye(3)[None], torch.zeros(1, 3), viewmat, K,
                         state["width"], state["height"], torch.tensor(background, dtype=torch.float32))
    return out.rgb[0].numpy(), out.alpha[0, ..., 0].numpy()


def screenshot(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator("#canvas").screenshot())).convert("RGB")).astype(np.int16)


def page_gaussians(page) -> dict[str, np.ndarray]:
    """The Gaussians the page's splat pass reads (its evaluation, normalised and clamped). -> attr -> [N, C]"""
    pos, rot, so = (np.array(a, np.float32).reshape(-1, 4) for a in page.evaluate("GEM.gaussians()"))
    return {"positions": pos[:, :3], "rotations": rot, "scales": so[:, :3], "opacities": so[:, 3]}


@needs_chromium
@pytest.mark.parametrize("where", ["cpu", "gpu"])
def test_page_renders_the_frame_as_the_python_renderer_does(tiny_export, where):
    from playwright.sync_api import sync_playwright

    out, _ = tiny_export
    model = load_compressed(out)
    meta, _ = read_container(out)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            if where == "cpu":  # SwiftShader is a software renderer: the page's own choice is the CPU
                assert open_page(browser, out, scale=1).evaluate("[GEM.evalMode, GEM.cpu.kernel]") == [
                    "cpu", "WebAssembly SIMD"]
            page = open_page(browser, out, scale=4, where=where)
            assert page.evaluate("GEM.evalMode") == where
            shot = screenshot(page)
            background = np.array(meta["view"]["background"]) * 255
            assert (np.abs(shot - background).sum(-1) > 30).sum() > 2000, "no head on the canvas"
            page.evaluate("GEM_UI.showFrame(2)")  # a fitted frame, with its own GEM pose
            image, state = capture(page)
            shown = screenshot(page)  # the canvas as the browser shows it (8 bits)
            evaluated = page_gaussians(page)
            decoded = page.evaluate("""() => ({sums: Object.fromEntries(Object.entries(GEM.arrays).map(
                    ([k, a]) => [k, [a.length, a.reduce((s, v) => s + v, 0)]])),
                tails: [1, 2, 3, 4, 5, 6, 7].map((n) => Array.from(
                    new Uint8Array(GEM_FORMAT.decodeBase85(GEM_FORMAT.TEST_TEXTS[n]))))})""".replace(
                "GEM_FORMAT.TEST_TEXTS", json.dumps({n: base64.b85encode(bytes(range(250, 250 - n, -1))).decode()
                                                      for n in range(1, 8)})))
            _, arrays = read_container(out)
        finally:
            browser.close()
    assert state["width"] == 4 * meta["view"]["width"]
    # the page decodes gem.js (base85, gzip, container) to the arrays Python reads
    for name, a in arrays.items():
        assert decoded["sums"][name] == [a.size, pytest.approx(float(a.astype(np.float64).sum()), rel=1e-6)], name
    assert [bytes(t) for t in decoded["tails"]] == [bytes(range(250, 250 - n, -1)) for n in range(1, 8)]
    # and evaluates the compressed GEM as Python does, at float32 rounding
    flat = torch.tensor(state["coefficients"])[None]
    coefficients = dict(zip(ATTRIBUTES, flat.split([model.n_components(a) for a in ATTRIBUTES], -1)))
    with torch.no_grad():
        g = model.reconstruct(coefficients)
    python = {"positions": g.means[0], "rotations": g.quats[0], "scales": g.scales[0], "opacities": g.opacities[0]}
    for attr, value in python.items():
        value = value.numpy()
        scale = np.abs(value).max()
        assert np.abs(evaluated[attr] - value).max() <= 1e-5 * scale, (attr, np.abs(evaluated[attr] - value).max(), scale)
    rgb, alpha = cpu_render(model, state, meta["view"]["background"])
    mask = alpha > 0.5
    assert mask.sum() > 2000
    psnr = -10 * math.log10(float(((image - rgb)[mask] ** 2).mean()) + 1e-20)
    assert shown.shape[:2] == rgb.shape[:2]
    shot_psnr = -10 * math.log10(float(((shown / 255.0 - rgb.clip(0, 1))[mask] ** 2).mean()) + 1e-20)
    print(f"web page ({where}) vs render_gem, inside the head mask ({int(mask.sum())} px): PSNR {psnr:.1f} dB "
          f"(its float image), {shot_psnr:.1f} dB (the canvas' screenshot)")
    assert psnr >= 35.0 and shot_psnr >= 35.0


@needs_chromium
def test_the_cpu_models_kernels_evaluate_the_bytes_as_numpy_does(tiny_export):
    """CpuModel with its WebAssembly SIMD kernel and with the JavaScript one (where WebAssembly SIMD is
    missing): mean + shift + sum_k a_k q_k, on sizes that are not multiples of the 16-byte step and with a
    zero factor."""
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(0)
    N, parts = 37, {"positions": (3, 5), "opacities": (1, 4)}
    data = {a: {"C": C, "mean": rng.normal(size=N * C).astype(np.float32),
                "rows": rng.integers(0, 256, size=(K, N * C)).astype(np.uint8)} for a, (C, K) in parts.items()}
    factors = {a: rng.normal(size=K).astype(np.float32) for a, (C, K) in parts.items()}
    factors["positions"][2] = 0.0
    shifts = {a: rng.normal(size=C).astype(np.float32) for a, (C, K) in parts.items()}
    script = """([N, data, factors, shifts, simd]) => {
        const validate = WebAssembly.validate;
        if (!simd) WebAssembly.validate = () => false;
        try {
            const parts = Object.fromEntries(Object.entries(data).map(([a, d]) => [a, {C: d.C,
                mean: Float32Array.from(d.mean), rows: d.rows.map((r) => Uint8Array.from(r))}]));
            const model = new GEM_CPU.CpuModel(N, parts), out = {kernel: model.kernel};
            for (const a of Object.keys(data))
                out[a] = Array.from(model.evaluate(a, Float32Array.from(factors[a]), Float32Array.from(shifts[a]))
                                    .subarray(0, N * data[a].C));
            return out;
        } finally { WebAssembly.validate = validate; }
    }"""
    args = [N, {a: {"C": d["C"], "mean": d["mean"].tolist(), "rows": d["rows"].tolist()} for a, d in data.items()},
            {a: f.tolist() for a, f in factors.items()}, {a: s.tolist() for a, s in shifts.items()}]
    out, _ = tiny_export
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = open_page(browser, out, scale=1)
            results = [page.evaluate(script, args + [simd]) for simd in (True, False)]
        finally:
            browser.close()
    assert [r["kernel"] for r in results] == ["WebAssembly SIMD", "JavaScript"]
    for a, d in data.items():
        C = d["C"]
        expected = (d["mean"].astype(np.float64).reshape(N, C) + shifts[a]
                    + (factors[a].astype(np.float64) @ d["rows"]).reshape(N, C)).ravel()
        for r in results:
            assert np.allclose(r[a], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()), (a, r["kernel"])


def tiny_view(width: int = 200, height: int = 300) -> dict:
    """A camera 0.6 m in front of the ellipsoid head (GEM space = world: the tracks' poses are identity)."""
    return {"viewmat": torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, 0.02], [0, 0, -1, 0.6], [0, 0, 0, 1]]),
            "K": torch.tensor([[500.0, 0, width / 2], [0, 500, height / 2], [0, 0, 1]]), "width": width,
            "height": height, "background": [1.0, 1.0, 1.0], "target": [0.0, 0.02, 0.0]}


def identity_track(model) -> dict:
    T = model.coefficients["positions"].shape[0]
    return {"name": "fitted", "label": "fitted", "coefficients": model.coefficients,
            "R": torch.eye(3).expand(T, 3, 3), "t": torch.zeros(T, 3)}


@needs_chromium
def test_a_gem_with_parts_renders_as_in_python(parts_gem, tmp_path):
    from playwright.sync_api import sync_playwright

    model = parts_gem
    assert model.parts == ["lower", "upper"]
    write_web_export(tmp_path, model, [identity_track(model)], tiny_view(), {"sliders": 2, "sigma": 3.0, "fps": 25},
                     1.0, 8)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = open_page(browser, tmp_path, scale=1)
            page.evaluate("GEM_UI.showFrame(5)")
            image, state = capture(page)
        finally:
            browser.close()
    rgb, alpha = cpu_render(load_compressed(tmp_path), state, [1.0, 1.0, 1.0])
    mask = alpha > 0.5
    assert mask.sum() > 2000
    assert -10 * math.log10(float(((image - rgb)[mask] ** 2).mean()) + 1e-20) >= 35.0


@needs_chromium
def test_a_slider_and_the_timeline_change_the_image(head_gem, tmp_path):
    from playwright.sync_api import sync_playwright

    T = head_gem.coefficients["positions"].shape[0]
    write_web_export(tmp_path, head_gem, [identity_track(head_gem)], tiny_view(),
                     {"sliders": 3, "sigma": 3.0, "fps": 25}, 1.0, 8)
    with static_server(tmp_path) as url, sync_playwright() as p:  # from a plain static server this time
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = open_page(browser, url, scale=1)
            first, _ = capture(page)
            page.locator("#frame").fill(str(T - 1))  # the timeline's last frame
            last, state = capture(page)
            k = head_gem.n_components("positions")
            assert np.allclose(state["coefficients"][:k], head_gem.coefficients["positions"][T - 1].numpy(), atol=1e-6)
            page.locator("#sliders input").first.fill("3")  # positions 0 to +3 sigma
            moved, state = capture(page)
            assert state["coefficients"][0] == 3.0
            page.locator("#play").click()
            page.wait_for_function(f"GEM.frame !== {T - 1}", timeout=10_000)  # playback advances the timeline
        finally:
            browser.close()
    changed = lambda a, b: int((np.abs(a - b).sum(-1) > 0.1).sum())  # noqa: E731
    assert changed(first, last) > 500, "the timeline did not change the image"
    assert changed(last, moved) > 500, "the slider did not change the image"
