"""Publishing a release as a Space (``training/make_space.py``), against the loopback Hub.

What a user relies on: one command creates (or updates) a Gradio Space with the
release variable and hardware set through the API and only the app's files
uploaded; its README front matter links the release; ``--dry-run`` writes a
folder that runs; a bad release id or a missing token stops before anything is
created.
"""

from __future__ import annotations

import ast
import os
import site
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from importlib.metadata import packages_distributions
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
from app_inputs import app_release_path, call, shape_image, upload  # noqa: E402

import yaml
import gradio

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "make_space.py"
PACKAGE = REPO / "revelio_hub"
RELEASE_ID = "me/revelio-toy"
SPACE_ID = "me/revelio-toy-space"
import make_space  # noqa: E402


@pytest.fixture()
def published_release(hub) -> str:
    """The bundled toy release's metadata (release.json + card) as a model repo on the loopback Hub."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(RELEASE_ID)
    api.upload_folder(repo_id=RELEASE_ID, folder_path=app_release_path(), allow_patterns=["release.json", "README.md"])
    return RELEASE_ID


def package_files() -> set[str]:
    """What the Space must hold of the package: every source file, no caches."""
    return {
        "revelio_hub/" + p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def space_files(hub) -> dict[str, bytes]:
    files = dict(hub.repos[("spaces", SPACE_ID)].head.files)
    files.pop(".gitattributes", None)  # the Hub's own, from repo creation
    return files


def test_make_space_creates_a_zerogpu_space_with_only_the_app(hub, published_release, capsys):
    code = make_space.main(["--release", published_release, "--space", SPACE_ID, "--hardware", "zero-a10g"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[-1] == f"{hub.url}/spaces/{SPACE_ID}"
    assert not any("HF_TOKEN" in line for line in out)  # a public release needs no secret

    space = hub.repos[("spaces", SPACE_ID)]
    assert space.sdk == "gradio" and not space.private
    assert space.variables["REVELIO_RELEASE"] == published_release
    assert space.variables["REVELIO_DEVICE"] == "auto"
    assert space.hardware == ["zero-a10g"]
    # CPU hardware runs on the CPU (app.py then moves backbone passes to a worker process).
    from revelio_hub.space import SpaceSpec

    assert SpaceSpec(published_release, hardware="cpu-basic").variables["REVELIO_DEVICE"] == "cpu"

    files = space_files(hub)
    assert set(files) == {"app.py", "requirements.txt", "README.md"} | package_files()
    assert not any(p.startswith("tests/") or "__pycache__" in p or p.endswith(".pyc") for p in files)
    assert files["app.py"] == (REPO / "app.py").read_bytes()

    meta = front_matter(files["README.md"].decode())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__ and meta["app_file"] == "app.py"
    assert meta["models"][0] == published_release
    assert "suggested_hardware" not in meta  # ZeroGPU cannot be suggested to people who duplicate the Space
    assert len(meta["short_description"]) <= 60 and meta["title"]

    reqs = files["requirements.txt"].decode().splitlines()
    import torch

    assert f"torch=={torch.__version__.split('+')[0]}" in reqs
    assert any(line.split("#")[0].strip() == "spaces" for line in reqs)
    assert not any("download.pytorch.org/whl/cpu" in line for line in reqs)  # the GPU build
    # gradio at the front matter's sdk_version, so `python app.py` runs in the folder after installing it
    # (with the mcp extra, so the Space's variable REVELIO_MCP=1 can serve MCP tools)
    assert f"gradio[mcp]=={meta['sdk_version']}" in [line.split("#")[0].strip() for line in reqs]


def test_rerun_updates_the_space_in_place(hub, published_release):
    from huggingface_hub import HfApi

    assert make_space.main(["--release", published_release, "--space", SPACE_ID, "--hardware", "zero-a10g",
                            "--private"]) == 0
    api = HfApi()
    api.upload_file(path_or_fileobj=b"x = 1\n", path_in_repo="revelio_hub/removed_module.py", repo_id=SPACE_ID,
                    repo_type="space")
    api.upload_file(path_or_fileobj=b"my notes\n", path_in_repo="notes.md", repo_id=SPACE_ID, repo_type="space")

    assert make_space.main(["--release", published_release, "--space", SPACE_ID, "--hardware", "cpu-basic"]) == 0
    space = hub.repos[("spaces", SPACE_ID)]
    assert space.private  # the same Space, updated
    assert space.hardware == ["zero-a10g", "cpu-basic"]
    files = space_files(hub)
    assert "revelio_hub/removed_module.py" not in files  # stale app files go
    assert files["notes.md"] == b"my notes\n"  # the owner's own files stay
    reqs = files["requirements.txt"].decode()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in reqs.splitlines()  # CPU hardware: CPU torch
    assert "spaces" not in [line.split("#")[0].strip() for line in reqs.splitlines()]
    assert front_matter(files["README.md"].decode())["suggested_hardware"] == "cpu-basic"


def test_a_private_release_is_flagged(hub, capsys):
    from huggingface_hub import HfApi

    HfApi().create_repo("me/private-release", private=True)
    HfApi().upload_folder(repo_id="me/private-release", folder_path=app_release_path(),
                          allow_patterns=["release.json", "README.md"])
    assert make_space.main(["--release", "me/private-release", "--space", SPACE_ID]) == 0
    assert "secret HF_TOKEN" in capsys.readouterr().out  # the Space needs a read token to see it


def test_unknown_release_is_a_one_line_error_and_creates_nothing(hub, capsys):
    code = make_space.main(["--release", "me/no-such-release", "--space", SPACE_ID])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "me/no-such-release" in err
    assert ("spaces", SPACE_ID) not in hub.repos
    assert not [r for r in hub.requests if r[0] == "POST"]


def test_missing_token_is_a_one_line_error_and_creates_nothing(hub, published_release, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(REPO))  # no stored login there
    before = len(hub.requests)
    out = subprocess.run([sys.executable, str(SCRIPT), "--release", published_release, "--space", SPACE_ID],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "token" in out.stderr.lower()
    assert ("spaces", SPACE_ID) not in hub.repos and len(hub.requests) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_app(args: list[str], cwd: Path, env: dict, log_path: Path) -> Iterator[str]:
    """``python <args> --port P`` started in ``cwd``, its output in ``log_path``; yields its URL once it answers
    (the test fails with the log when it exits or does not answer in 180 s), and stops it afterwards."""
    port = _free_port()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(url, timeout=5).close()
                    break
                except OSError:
                    time.sleep(1)
            assert proc.poll() is None and time.monotonic() < deadline, f"the app did not start:\n{log_path.read_text()}"
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow  # starts the Space's app: 24 s loaded
def test_dry_run_writes_a_folder_whose_app_starts_offline(hub, published_release, tmp_path, capsys):
    out_dir = tmp_path / "space"
    assert make_space.main(["--release", published_release, "--hardware", "cpu-basic", "--dry-run", str(out_dir)]) == 0
    assert "nothing was created" in capsys.readouterr().out
    assert not [r for r in hub.requests if r[0] == "POST" and "/api/repos/create" in r[1] and "space" in r[1]]
    assert ("spaces", SPACE_ID) not in hub.repos
    written = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}
    assert written == {"app.py", "requirements.txt", "README.md"} | package_files()
    assert front_matter((out_dir / "README.md").read_text())["models"][0] == published_release

    # The folder runs on its own: its package, no Hub, the bundled release.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_ENDPOINT")}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    which = subprocess.run([sys.executable, "-c", "import revelio_hub; print(revelio_hub.__file__)"], cwd=out_dir,
                           env=env, capture_output=True, text=True, timeout=120)
    assert Path(which.stdout.strip()).resolve().parent == (out_dir / "revelio_hub").resolve()
    with served_app(["app.py", "--release", app_release_path(), "--no-warmup"], out_dir, env, tmp_path / "app.log"):
        pass  # it answered HTTP


def test_about_tab_links_the_model_card_and_the_paper(hub, published_release):
    from revelio_hub.app.state import LoadedRelease
    from revelio_hub.app.ui import card_markdown
    from revelio_hub.cards import PAPER_URL

    remote = card_markdown(LoadedRelease.open(published_release))
    assert f"]({hub.url}/{published_release})" in remote
    assert f"]({PAPER_URL})" in remote and PAPER_URL == "https://arxiv.org/abs/2411.16725"
    local = card_markdown(LoadedRelease.open(app_release_path()))
    assert f"]({PAPER_URL})" in local and f"{hub.url}/" not in local  # a local folder has no Hub page


# ------------------------------------------------------- offline preview and complete requirements


def imported_distributions(folder: Path) -> dict[str, str]:
    """Distribution of every third-party module the code under ``folder`` imports -> one file importing it.

    Imports inside a ``try`` that catches ImportError are optional (``spaces``) and left out.
    """
    owners = packages_distributions()
    found: dict[str, str] = {}
    for path in folder.rglob("*.py"):
        if any(part in ("tests", "releases", "benchmarks") for part in path.relative_to(folder).parts):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                    for h in t.handlers if "ImportError" in ast.unparse(h.type or ast.Name("BaseException"))
                    for stmt in t.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("__future__", "revelio_hub", "make_space"):
                    continue
                for dist in owners.get(top, [top]):
                    found.setdefault(dist.lower().replace("_", "-"), str(path.relative_to(folder)))
    return found


def requirement_names(text: str) -> set[str]:
    """Distribution names a requirements file installs (options such as --extra-index-url left out)."""
    from revelio_hub.space import _requirement_name

    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return {_requirement_name(line) for line in lines if line and not line.startswith("-")}


def test_repo_requirements_install_before_the_code_and_cover_every_import():
    """The repository deploys as a Space as it stands: its requirements.txt is complete without the code."""
    text = (REPO / "requirements.txt").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    assert not any(line.startswith(("-e", "--editable", ".")) for line in lines)  # installs before the copy
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines  # CPU wheel on CPU hardware
    import torch

    assert f"torch=={torch.__version__.split('+')[0]}" in lines
    readme = (REPO / "README.md").read_text()
    assert f"gradio[mcp]=={front_matter(readme)['sdk_version']}" in lines  # what the Space's SDK installs, MCP included
    names = requirement_names(text)
    missing = {dist: where for dist, where in imported_distributions(REPO).items() if dist not in names}
    assert not missing, f"imported but not in requirements.txt: {missing}"
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert requirement_names("\n".join(declared)) == names  # one dependency list, written twice, in step


@pytest.mark.slow  # starts the preview's app: 78 s loaded
def test_offline_preview_of_a_local_release_serves_analyze_json_with_only_its_requirements(tmp_path, capsys):
    """``--dry-run`` from a local release folder: no Hub, a marked preview, a folder that runs on its own."""
    out_dir = tmp_path / "preview"
    release = Path(app_release_path())
    # Publishing still needs a Hub release; the one-line refusal points at the preview.
    assert make_space.main(["--release", str(release), "--space", SPACE_ID]) == 2
    refused = capsys.readouterr().err.strip().splitlines()
    assert len(refused) == 1 and "push it first" in refused[0] and "--dry-run" in refused[0]
    offline = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_TOKEN")}
    offline.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"),
                   PYTHONPATH=str(REPO))  # no Hub to reach, no token, no cache
    made = subprocess.run([sys.executable, str(SCRIPT), "--release", str(release), "--dry-run", str(out_dir)],
                          env=offline, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert "preview" in made.stdout and "nothing was created" in made.stdout
    bundled = f"releases/{release.name}"
    assert f"REVELIO_RELEASE={bundled} python app.py" in made.stdout  # how to run it
    assert (out_dir / bundled / "release.json").read_bytes() == (release / "release.json").read_bytes()
    readme = (out_dir / "README.md").read_text()
    meta = front_matter(readme)
    assert "preview" in meta["title"] and "Preview" in readme and "models" not in meta  # not a Hub release

    # Its requirements name every distribution its code imports (what a fresh venv would install).
    reqs = (out_dir / "requirements.txt").read_text()
    names = requirement_names(reqs)
    missing = {dist: where for dist, where in imported_distributions(out_dir).items() if dist not in names}
    assert not missing, f"imported but not in the Space's requirements.txt: {missing}"

    # Run from the folder with a clean environment: installed distributions only (site-packages, no .pth
    # hooks, so no editable install of this checkout), no PYTHONPATH to the repository, offline.
    sites = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join(sites),
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "MPLCONFIGDIR": str(tmp_path / "mpl"),
           "REVELIO_RELEASE": bundled}
    elsewhere = subprocess.run([sys.executable, "-S", "-c", "import revelio_hub"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert elsewhere.returncode != 0  # the package comes from the folder, not from this checkout
    with served_app(["-S", "app.py", "--no-warmup", "--workers", "0"], out_dir, env, tmp_path / "app.log") as url:
        served = SimpleNamespace(url=url)
        image = upload(served, shape_image(tmp_path / "red.png"))
        event, payload = call(served, "analyze_json", [{"path": image, "meta": {"_type": "gradio.FileData"}}, "", -1, ""])
        assert event == "complete", payload
        answer = payload[0]
        assert answer["neurons"] and answer["layer"] and answer["predictions"], answer
    logged = (tmp_path / "app.log").read_text()
    assert "HTTP Request" not in logged and "Traceback" not in logged, logged[-2000:]


@pytest.mark.slow  # starts the app on a Hub release: 29 s loaded
def test_app_log_has_no_line_per_hub_request(hub, tmp_path):
    """Serving a Hub release, app.py logs its start-up, not one INFO line per HTTP request huggingface_hub makes."""
    from huggingface_hub import HfApi

    HfApi().create_repo(RELEASE_ID)
    HfApi().upload_folder(repo_id=RELEASE_ID, folder_path=app_release_path(),
                          allow_patterns=["release.json", "README.md", "examples/*", "figures/*"])
    before = len(hub.requests)
    env = dict(os.environ)  # the fixture's endpoint and token
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(REPO),
               GRADIO_ANALYTICS_ENABLED="False")
    with served_app([str(REPO / "app.py"), "--release", RELEASE_ID, "--no-warmup", "--workers", "0"], tmp_path, env,
                    tmp_path / "app.log"):
        pass  # it started, reading the release from the Hub
    assert len(hub.requests) - before >= 3  # the release's files came from the Hub, one request each or more
    logged = (tmp_path / "app.log").read_text()
    assert "HTTP Request" not in logged, logged[-2000:]
