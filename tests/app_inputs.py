"""Image files that exercise the app's input handling (shared by the app tests).

Each maker writes one file into a folder and returns its path. ``BAD_INPUTS``
maps a case name to (maker, regex the user-facing error must match);
``GOOD_ODD_INPUTS`` are unusual but valid images the app must accept.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image


def class_colour_png(i: int, height: int = 32, width: int = 32) -> bytes:
    """PNG bytes of seeded pixel noise whose channel ``i % 3`` is saturated: image ``i`` of a 3-class dataset
    whose class is its colour (the feature-store and streaming tests' rows)."""
    import io

    pixels = np.random.default_rng(i).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[..., i % 3] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def red_and_blue(folder: Path) -> dict[str, Path]:
    """Two shape images that differ in colour and background (the app tests' usual pair)."""
    return {
        "red": shape_image(folder / "red.png", color=(220, 40, 40)),
        "blue": shape_image(folder / "blue.png", color=(40, 40, 220), bg=(30, 30, 30)),
    }


def shape_image(path: Path, color=(220, 40, 40), size: int = 96, bg=(245, 245, 235)) -> Path:
    """A simple red disc on a light background, like the toy release's training data."""
    from PIL import ImageDraw

    img = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(img).ellipse((size * 0.25, size * 0.25, size * 0.75, size * 0.75), fill=color)
    img.save(path)
    return path


def not_an_image(folder: Path) -> Path:
    path = folder / "notes.png"
    path.write_text("this is a text file with a .png name\n")
    return path


def corrupt_png(folder: Path) -> Path:
    good = shape_image(folder / "good_for_corrupt.png")
    data = good.read_bytes()
    path = folder / "corrupt.png"
    path.write_bytes(data[: len(data) // 2])  # truncated mid-IDAT
    return path


def huge_png(folder: Path) -> Path:
    """A tiny file whose header claims 60000×60000 pixels (a decompression bomb)."""
    src = folder / "small_for_huge.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(src)
    data = bytearray(src.read_bytes())
    # IHDR chunk: 8-byte signature, 4-byte length, b"IHDR", width, height, ...; CRC over type+data.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", 60000, 60000)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    path = folder / "huge.png"
    path.write_bytes(bytes(data))
    return path


def tiny_png(folder: Path) -> Path:
    path = folder / "tiny.png"
    Image.new("RGB", (4, 4), (200, 0, 0)).save(path)
    return path


def grayscale_png(folder: Path) -> Path:
    path = folder / "gray.png"
    Image.open(shape_image(folder / "g_src.png")).convert("L").save(path)
    return path


def rgba_png(folder: Path) -> Path:
    path = folder / "rgba.png"
    Image.open(shape_image(folder / "a_src.png")).convert("RGBA").save(path)
    return path


def cmyk_jpeg(folder: Path) -> Path:
    path = folder / "cmyk.jpg"
    Image.open(shape_image(folder / "c_src.png")).convert("CMYK").save(path, quality=95)
    return path


def png16(folder: Path) -> Path:
    path = folder / "gray16.png"
    arr = (np.linspace(0, 65535, 96 * 96).reshape(96, 96)).astype(np.uint16)
    Image.fromarray(arr).save(path)  # mode I;16
    return path


def animated_gif(folder: Path) -> Path:
    path = folder / "anim.gif"
    frames = [Image.open(shape_image(folder / f"f{i}.png", color=c)) for i, c in enumerate([(220, 40, 40), (40, 40, 220)])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def exif_rotated_jpeg(folder: Path) -> Path:
    """A 120×80 JPEG whose EXIF orientation says 'rotate 90°' (viewers show it 80×120)."""
    path = folder / "rotated.jpg"
    img = Image.new("RGB", (120, 80), (240, 240, 240))
    img.paste((200, 30, 30), (0, 0, 60, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)
    return path


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "not_an_image": (not_an_image, "not an image"),
    "corrupt": (corrupt_png, "corrupt or truncated"),
    "huge": (huge_png, "decompression bomb|more than the allowed"),
    "tiny": (tiny_png, "at least"),
}

GOOD_ODD_INPUTS: dict[str, Callable[[Path], Path]] = {
    "grayscale": grayscale_png,
    "rgba": rgba_png,
    "cmyk": cmyk_jpeg,
    "16bit": png16,
    "animated": animated_gif,
    "exif_rotated": exif_rotated_jpeg,
}


_BUILT: dict[str, str] = {}


def app_release_path() -> str:
    """The release the app tests run on.

    ``$REVELIO_TEST_RELEASE`` if set; else the bundled ``releases/toy-shapes``;
    else (a checkout where the bundled release is not built yet) a smoke-size
    toy release built once per test process by the project's own pipeline
    (about 10 s on 2 cores): real backbone, SAEs, Diff-C and atlases, tiny sizes.
    """
    import os
    import tempfile

    from revelio_hub.app.state import DEFAULT_RELEASE_PATH

    path = os.environ.get("REVELIO_TEST_RELEASE") or str(DEFAULT_RELEASE_PATH)
    if Path(path, "release.json").is_file():
        return path
    if "smoke" not in _BUILT:
        from revelio_hub.toy.pipeline import ToyBuildConfig, build_toy_release

        root = Path(tempfile.mkdtemp(prefix="revelio-app-release-"))
        build_toy_release(ToyBuildConfig.smoke(), root / "toy-shapes", root / "work", progress=False, log=lambda *_: None)
        _BUILT["smoke"] = str(root / "toy-shapes")
    return _BUILT["smoke"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedApp:
    """The real app (``build_ui`` + ``launch``) served in this process on a free loopback port."""

    def __init__(self, state, **launch: Any) -> None:
        """``launch`` adds or overrides ``Blocks.launch`` arguments (``mcp_server=True``)."""
        from revelio_hub.app.ui import build_ui, launch_kwargs

        self.state = state
        self.demo = build_ui(state)
        self.port = free_port()
        kwargs = {**launch_kwargs(state), **launch}
        self.demo.launch(server_name="127.0.0.1", server_port=self.port, prevent_thread_lock=True, quiet=True, **kwargs)
        self.url = f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self.demo.close()
        self.state.close()  # backbone worker processes, if the state has them

    def __enter__(self) -> "LaunchedApp":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: The tag Gradio's uploads carry (``gradio_client.handle_file``, the browser).
FILEDATA_TAG = {"_type": "gradio.FileData"}


def call(app, api_name: str, data: list, timeout: float = 120) -> tuple[str, Any]:
    """POST ``data`` to ``/gradio_api/call/<api_name>`` and read the event stream: ("complete"|"error", payload)."""
    import httpx

    r = httpx.post(f"{app.url}gradio_api/call/{api_name}", json={"data": data}, timeout=timeout)
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    event = None
    with httpx.stream("GET", f"{app.url}gradio_api/call/{api_name}/{event_id}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                return event, json.loads(line.split(":", 1)[1])
    raise AssertionError(f"no result for /{api_name}")


def queue_event(app, fn_index: int, data: list, session: str, event_data: Any = None,
                params: Optional[dict] = None) -> dict:
    """Run one event as the browser does (``/queue/join`` + the session's event stream); its final message.

    ``params`` are the page's query parameters (the browser sends them with the event).
    """
    import httpx

    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": event_data, "trigger_id": None}
    r = httpx.post(f"{app.url}gradio_api/queue/join", params=params, json=body, timeout=60)
    assert r.status_code == 200, r.text
    with httpx.stream("GET", f"{app.url}gradio_api/queue/data", params={"session_hash": session}, timeout=120) as s:
        for line in s.iter_lines():
            msg = json.loads(line[5:]) if line.startswith("data:") else {}
            if msg.get("msg") == "process_completed":
                return msg
    raise AssertionError("no answer")


class Heartbeat:
    """A browser tab's heartbeat connection (``GET /gradio_api/heartbeat/<session>``), held open in a thread."""

    def __init__(self, url: str, session: str) -> None:
        import threading

        import httpx

        self.client = httpx.Client(timeout=60)
        self.opened = threading.Event()

        def hold() -> None:
            try:
                with self.client.stream("GET", f"{url}gradio_api/heartbeat/{session}") as stream:
                    for _ in stream.iter_lines():
                        self.opened.set()
            except Exception:  # closed from the test
                pass

        self.thread = threading.Thread(target=hold, daemon=True)
        self.thread.start()
        assert self.opened.wait(30)

    def close(self) -> None:
        self.client.close()
        self.thread.join(10)


def upload(app, path: Path) -> str:
    """Upload ``path`` the way the browser and gradio_client do; returns its server-side path."""
    import httpx

    with open(path, "rb") as fh:
        r = httpx.post(f"{app.url}gradio_api/upload", files={"files": (path.name, fh, "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()[0]


class LibraryReference:
    """The release used through the library directly (no app code), to check the app against."""

    def __init__(self, release_path: str) -> None:
        from revelio_hub.release import Release

        self.release = Release.from_pretrained(release_path)
        self.backbone = self.release.load_backbone()
        self._entries: dict = {}

    def entry(self, layer: str, t: int):
        if (layer, t) not in self._entries:
            self._entries[(layer, t)] = self.release.load(layer, t)
        return self._entries[(layer, t)]

    def run(self, image_path, layer: str, t: int):
        """(dense image-level SAE activations, Diff-C top-5) for one image file."""
        import torch

        from revelio_hub.images import load_image

        entry = self.entry(layer, t)
        recipe = entry.sae.recipe or {}
        with torch.no_grad():
            maps = self.backbone.extract(
                [load_image(image_path)], [layer], [t], seed=int(recipe.get("noise_seed") or 0),
                ensemble=int(recipe.get("ensemble") or 1),
            )[(layer, t)]
            acts = entry.sae.image_activations(maps)[0]
            preds = entry.diffc.predict(maps, top_k=5)[0] if entry.diffc is not None else {}
        return acts, preds


def held_out_shapes(n: int, start: int = 0, image_size: int = 32) -> tuple[list[Image.Image], list[int]]:
    """Toy test-split images (the generator's seed 1, rows ``start`` …) and their shape ids, as the release's
    held-out images."""
    from revelio_hub.toy.shapes import make_shapes_dataset

    ds = make_shapes_dataset(n, seed=1, image_size=image_size, start_index=start)
    return [img.convert("RGB") for img in ds["image"]], list(ds["shape"])


def calibrated_release(images: int = 30) -> str:
    """A copy of :func:`app_release_path` with its t=25 entries calibrated on a small shift suite, made once per
    test process (a small suite, ~20 s on 2 idle cores; the bundled release's own calibration took minutes)."""
    import shutil
    import tempfile

    from revelio_hub.interpret.calibration import CalibrationConfig, calibrate_entries, write_calibration
    from revelio_hub.release import Release

    if "calibrated" in _BUILT:
        return _BUILT["calibrated"]
    src = app_release_path()
    out = Path(tempfile.mkdtemp(prefix="revelio-calibrated-")) / "calibrated"
    shutil.copytree(src, out)
    release = Release.from_pretrained(str(out))
    shapes, labels = held_out_shapes(images, image_size=int(release.config.get("image_size") or 32))
    config = CalibrationConfig(max_images=images, timesteps=(25,), shifts=("rotate", "zoom_in", "mosaic"))
    write_calibration(out, calibrate_entries(release, shapes, labels, config, log=lambda *_: None))
    _BUILT["calibrated"] = str(out)
    return str(out)


def photo(folder: Path) -> Path:
    """A real photograph that ships with matplotlib (Grace Hopper), saved as PNG: nothing like a toy shape."""
    import matplotlib

    out = folder / "photo.png"
    Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB").save(out)
    return out
