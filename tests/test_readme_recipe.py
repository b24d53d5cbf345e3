"""The README's "Train and release your own" section, run as written (the rehearsal).

The section's code blocks are taken from README.md as they are, in order, and run
with bash in a fresh directory. Only the values of the variables the README
documents for this are changed: ``BACKBONE`` becomes a tiny SD-1.5-layout folder,
``DATA`` a local image folder with ``train/`` and ``test/`` splits, ``LAYERS`` and
``TIMESTEPS`` a 2 × 1 grid, ``SIZE`` 64 px, ``SAE_ARGS``/``DIFFC_ARGS`` a few
steps and epochs, and the multi-GPU ``LAUNCH`` becomes ``torchrun --nproc_per_node 2``
(the CPU-only spelling the README gives). ``hf auth login`` is skipped by the
README's own ``[ -n "$HF_TOKEN" ] ||`` guard, and ``--push`` goes to the loopback
Hub of ``tests/hub_server.py``. The app block is started in the background when
the script reaches it, answers one ``/analyze_json`` upload, and is stopped before
the next block runs. Finally the section's Python block loads the pushed release
back. If a README command changes, this test runs the new command.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tiny_models import make_tiny_sd15  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Train and release your own"
APP_MARKER = "@@README_APP_BLOCK@@"
RELEASE = "releases/revelio-sd15-oxford-pets"
CLASSES = {"circle": (220, 60, 40), "square": (40, 90, 220), "stripe": (40, 170, 60)}


def readme_blocks(text: str | None = None) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the section, in order, indentation removed."""
    text = text if text is not None else (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    blocks = []
    for match in re.finditer(r"^([ \t]*)```(\w+)[ \t]*\n(.*?)^\1```[ \t]*$", section, re.M | re.S):
        indent, language, body = match.groups()
        lines = [line[len(indent):] if line.startswith(indent) else line for line in body.splitlines()]
        blocks.append((language, "\n".join(lines) + "\n"))
    return blocks


def override_variables(code: str, values: dict[str, str], found: set[str]) -> str:
    """Replace the value of each ``NAME=...`` assignment line whose NAME is in ``values``."""
    out = []
    for line in code.splitlines():
        match = re.match(r"^(\s*)([A-Z_][A-Z0-9_]*)=", line)
        if match and match.group(2) in values:
            name = match.group(2)
            found.add(name)
            line = f"{match.group(1)}{name}={shlex.quote(values[name])}"
        out.append(line)
    return "\n".join(out) + "\n"


def _is_app_block(code: str) -> bool:
    commands = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return len(commands) == 1 and commands[0].lstrip().startswith("python app.py")


TEST_PER_CLASS = 7


def _make_dataset(root: Path) -> Path:
    """Three classes of coloured shapes, 4 train and 7 test images each, as ImageFolder splits.

    7 test images per class: the README's calibration step needs at least 20 held-out images.
    """
    from PIL import Image, ImageDraw

    for split, count in (("train", 4), ("test", TEST_PER_CLASS)):
        for c, (name, colour) in enumerate(CLASSES.items()):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = Image.new("RGB", (64, 64), (235 - 10 * i, 230, 220))
                draw = ImageDraw.Draw(image)
                box = (8 + 3 * i, 10, 48 + 2 * i, 52)
                [draw.ellipse, draw.rectangle, lambda b, fill: draw.rectangle((b[0], 28, b[2], 36), fill=fill)][c](
                    box, fill=colour)
                image.save(folder / f"{name}_{i}.png")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _check_app(app_code: str, work: Path, env: dict, image: Path, log: list[str]) -> dict:
    """Start the README's app command, make one /analyze_json upload, stop it; returns the answer."""
    from gradio_client import Client, handle_file

    port = _free_port()
    proc = subprocess.Popen(["bash", "-c", app_code], cwd=work, env={**env, "GRADIO_SERVER_PORT": str(port)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError("the README's app command exited:\n" + "".join(lines)[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError("the app did not start in 180 s:\n" + "".join(lines)[-3000:])
                time.sleep(0.5)
        client = Client(url, verbose=False)
        return client.predict(handle_file(str(image)), "", -1, "", api_name="/analyze_json")
    finally:
        _kill(proc)
        log.append("".join(lines))


@pytest.mark.slow
def test_readme_recipe_runs_as_written(tmp_path, hub):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("training", "app.py"):  # the README runs from a checkout: its scripts, nothing else
        (work / name).symlink_to(ROOT / name)
    backbone = make_tiny_sd15(tmp_path / "tiny-sd15")
    data = _make_dataset(tmp_path / "pets")
    values = {
        "RECIPE": "default", "BACKBONE": str(backbone), "DATA": str(data), "LAYERS": "bottleneck up_ft1", "TIMESTEPS": "25",
        "SIZE": "64", "SAE_ARGS": "--steps 30 --expansion 4 --warmup-steps 5 --no-progress",
        "DIFFC_ARGS": "--epochs 2 --hidden 32 --no-progress", "LAUNCH": "torchrun --nproc_per_node 2",
    }

    blocks = readme_blocks()
    found: set[str] = set()
    script = ["set -e"]
    app_blocks = []
    for i, (language, code) in enumerate(blocks):
        if language != "bash":
            continue
        code = override_variables(code, values, found)
        if _is_app_block(code):
            app_blocks.append(code)
            script.append(f"echo {APP_MARKER}; read -r _")
        else:
            script += [f"echo '@@ README block {i} @@'", code]
    assert found == set(values), f"the README no longer sets {sorted(set(values) - found)}"
    assert len(app_blocks) == 1, "the section should start the app once, in a block of its own"
    python_blocks = [code for language, code in blocks if language == "python"]
    assert python_blocks and all("your-hf-username/" in code for code in python_blocks)

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    (work / "recipe.sh").write_text("\n".join(script) + "\n")
    started = time.perf_counter()
    proc = subprocess.Popen(["bash", "recipe.sh"], cwd=work, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(line) for line in proc.stdout], lines.put(None)), daemon=True).start()
    output: list[str] = []
    app_answer, app_log = None, []
    marks: list[tuple[str, float]] = []
    try:
        deadline = time.time() + 900
        while True:
            line = lines.get(timeout=max(1.0, deadline - time.time()))
            if line is None:
                break
            output.append(line)
            if line.startswith("@@ README block") or line.strip() == APP_MARKER:
                marks.append((line.strip(), time.perf_counter()))
            if line.strip() == APP_MARKER:
                image = next((data / "test" / "circle").iterdir())
                app_answer = _check_app(app_blocks[0], work, env, image, app_log)
                proc.stdin.write("\n")
                proc.stdin.flush()
        rc = proc.wait(timeout=60)
    except queue.Empty:
        raise AssertionError("the README recipe did not finish in 900 s:\n" + "".join(output)[-6000:])
    finally:
        _kill(proc)
    seconds = time.perf_counter() - started
    log = "".join(output)
    assert rc == 0, f"a README block failed (rc {rc}):\n{log[-8000:]}"
    ends = [t for _, t in marks[1:]] + [started + seconds]
    print(f"README recipe ran in {seconds:.0f} s; per block: "
          + ", ".join(f"{name.strip('@ ')} {end - t:.0f} s" for (name, t), end in zip(marks, ends)))

    # the step-2 warning: the default batch (8192) is larger than the data, as on Pets
    assert re.search(r"batch_size=8192 exceeds the \d+ training samples: each of the 30 steps uses the whole", log)

    # the app served the release and analysed the upload
    assert app_answer is not None and app_answer["neurons"], app_log
    assert Path(RELEASE).name in app_answer["release"] and app_answer["layer"] in ("bottleneck", "up_ft1")

    from huggingface_hub import ModelCard

    from revelio_hub import Release

    local = Release.from_pretrained(work / RELEASE)
    assert local.entries == [("bottleneck", 25), ("up_ft1", 25)]
    assert local.load("up_ft1", 25).diffc is not None and local.load("bottleneck", 25).diffc is None
    assert 1 <= len(local.examples) <= 4 and {c for _, c in local.examples} == set(CLASSES)
    card_yaml = (work / RELEASE / "README.md").read_text().split("---")[1]
    assert str(tmp_path) not in card_yaml and "base_model" not in card_yaml and "datasets" not in card_yaml
    assert not (work / "runs/diffc/up_ft1_t25/checkpoint").exists()  # optimizer state removed after the run
    # the multi-GPU block ran with 2 processes: an atlas over the test split
    assert Release.from_pretrained(work / RELEASE).config["dataset"]["split"] == "test"
    from revelio_hub.interpret.atlas_model import NeuronAtlas

    assert NeuronAtlas.load(work / "runs/atlas-test/up_ft1_t25").num_images == TEST_PER_CLASS * len(CLASSES)

    # pushed to the (loopback) Hub; the README's Python block loads it back
    remote = Release.from_pretrained("your-hf-username/revelio-sd15-oxford-pets")
    assert remote.entries == local.entries
    assert ModelCard.load("your-hf-username/revelio-sd15-oxford-pets").data.library_name == "revelio-hub"
    for code in python_blocks:
        done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_readme_paper_recipe_runs_as_written(tmp_path):
    """``RECIPE=paper``: steps 1–4 as written (features of both splits, the paper-recipe k-SAEs evaluated
    on the test split, online Diff-C with fresh views every epoch); each model records the recipe."""
    import json

    work = tmp_path / "work"
    work.mkdir()
    (work / "training").symlink_to(ROOT / "training")
    values = {
        "RECIPE": "paper", "BACKBONE": str(make_tiny_sd15(tmp_path / "tiny-sd15")),
        "DATA": str(_make_dataset(tmp_path / "pets")), "LAYERS": "up_ft1", "TIMESTEPS": "25", "SIZE": "64",
        "SAE_ARGS": "--steps 30 --expansion 4 --warmup-steps 5 --no-progress",
        "DIFFC_ARGS": "--epochs 2 --hidden 32 --no-progress",
    }
    script, found = ["set -e"], set()
    for language, code in readme_blocks():
        if language != "bash":
            continue
        script.append(override_variables(code, values, found))
        if "train_diffc.py train" in code:  # step 4: the paper's training is complete
            break
    assert found == set(values)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    (work / "paper.sh").write_text("\n".join(script) + "\n")
    done = subprocess.run(["bash", "paper.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    assert not (work / "stores/sd15-pets-512-train").exists()  # the paper extracts Diff-C features online
    store = json.loads((work / "stores/sd15-pets-256-train/summary.json").read_text())
    assert store["recipe"]["resize"] == "bilinear"
    sae_cfg = json.loads((work / "runs/sae/up_ft1_t25/config.json").read_text())
    sae_eval = json.loads((work / "runs/sae/up_ft1_t25/eval.json").read_text())
    assert sae_cfg["training_recipe"] == "paper" and sae_cfg["relu"] is False and sae_cfg["input_norm"] is None
    assert sae_eval["evaluated_on"] == "eval_split" and sae_eval["n_train"] == 4 * len(CLASSES)
    assert sae_eval["n_samples"] == TEST_PER_CLASS * len(CLASSES) and "original_l0_dense_pre_topk" in sae_eval
    diffc_cfg = json.loads((work / "runs/diffc/up_ft1_t25/config.json").read_text())
    diffc_eval = json.loads((work / "runs/diffc/up_ft1_t25/eval.json").read_text())
    assert diffc_cfg["training_recipe"] == "paper" and diffc_cfg["dropout"] == 0.0
    assert diffc_eval["num_val_images"] == 0 and diffc_eval["best_epoch"] == 1 and diffc_eval["split"] == "test"


def test_section_parser_keeps_blocks_verbatim():
    text = "intro\n## Train and release your own\n\n```bash\nA=1\necho $A\n```\n- item\n  ```bash\n  X=2\n  ```\n" \
           "```python\nprint(1)\n```\n## Next\n```bash\nnot this\n```\n"
    blocks = readme_blocks(text)
    assert blocks == [("bash", "A=1\necho $A\n"), ("bash", "X=2\n"), ("python", "print(1)\n")]
    found: set[str] = set()
    assert override_variables("A=1  # comment\nB=2\necho $A\n", {"A": "x y"}, found) == "A='x y'\nB=2\necho $A\n"
    assert found == {"A"}
    assert _is_app_block("python app.py --release r   # open it\n") and not _is_app_block("python app.py\nls\n")
