"""Release bundles: local round trip, publish/load through the real huggingface_hub client against a
loopback Hub, the model card, the make_release CLI, and clear errors for broken files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tiny_models import make_tiny_pixel  # noqa: E402

from revelio_hub.interpret.atlas_builder import build_atlas  # noqa: E402
from revelio_hub.interpret.atlas_model import NeuronAtlas  # noqa: E402
from revelio_hub.diffc.model import DiffC  # noqa: E402
from revelio_hub.release import EntrySource, Release, assemble_release, push_release  # noqa: E402
from revelio_hub.sae.model import KSparseAutoencoder  # noqa: E402

CLASSES = ["red", "blue"]
BACKBONE_NAME = "test/tiny-pixel"
ENTRIES = [("bottleneck", 25), ("up_ft0", 100)]
REPO = "me/colours"


def _images() -> list[Image.Image]:
    out = []
    for i in range(16):
        shade = 120 + 8 * i
        out.append(Image.new("RGB", (40, 40), (shade, 20, 30) if i % 2 == 0 else (20, 30, shade)))
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Trainer-style outputs for two entries of a tiny pixel backbone, with metrics measured on real features."""
    from revelio_hub.backbones import load_backbone
    from revelio_hub.diffc.metrics import topk_accuracy
    from revelio_hub.sae.training import evaluate_sae

    root = tmp_path_factory.mktemp("artifacts")
    backbone_dir = make_tiny_pixel(root / "backbone", image_size=32)
    backbone = load_backbone(str(backbone_dir))
    backbone.name = BACKBONE_NAME
    images = _images()
    labels = torch.arange(len(images)) % 2
    ids = torch.arange(len(images))
    maps = backbone.extract(images, [l for l, _ in ENTRIES], sorted({t for _, t in ENTRIES}))
    sources, measured = [], {}
    torch.manual_seed(0)
    for layer, t in ENTRIES:
        x = maps[(layer, t)]
        d = x.shape[1]
        sae_dir, diffc_dir, atlas_dir = (root / kind / layer / f"t{t}" for kind in ("sae", "diffc", "atlas"))
        sae = KSparseAutoencoder(d_in=d, n_latents=4 * d, k=4, recipe=backbone.recipe(layer, t).to_dict())
        sae.save_pretrained(sae_dir)
        sae_eval = evaluate_sae(sae, x.mean(dim=(2, 3)))
        (sae_dir / "eval.json").write_text(json.dumps(sae_eval))
        (sae_dir / "checkpoint").mkdir()
        (sae_dir / "checkpoint" / "state.safetensors").write_bytes(b"optimizer state must not be released")
        diffc = DiffC(d, CLASSES, head="linear", recipe=backbone.recipe(layer, t, granularity="spatial")).eval()
        diffc.save_pretrained(diffc_dir)
        logits = diffc(x)
        diffc_eval = {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 2),
                      "split": "test"}
        (diffc_dir / "eval.json").write_text(json.dumps(diffc_eval))
        atlas = build_atlas([(x, labels, ids)], CLASSES, sae=sae, thumbnails=lambda i: images[i], out=atlas_dir,
                            extra_meta={"dataset": "test/colours", "layer": layer, "timestep": t})
        measured[(layer, t)] = {"sae": sae_eval, "diffc": diffc_eval, "atlas": atlas.summary_stats}
        sources.append(EntrySource(sae=sae_dir, diffc=diffc_dir, atlas=atlas_dir))
    examples = []
    for i in (0, 1):
        path = root / f"example_{CLASSES[i]}.png"
        images[i].save(path)
        examples.append((path, CLASSES[i]))
    return {"root": root, "backbone_dir": backbone_dir, "sources": sources, "measured": measured,
            "examples": examples, "maps": maps}


@pytest.fixture(scope="module")
def release_dir(artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "revelio-colours"
    assemble_release(out, artifacts["sources"], embed_backbone=artifacts["backbone_dir"],
                     examples=artifacts["examples"], dataset="test/colours", dataset_split="test", repo_id=REPO)
    return out


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_round_trip(artifacts, release_dir):
    release = Release.from_pretrained(release_dir)
    assert release.entries == ENTRIES
    assert release.backbone_id == BACKBONE_NAME and release.class_names == CLASSES
    for (layer, t), src in zip(ENTRIES, artifacts["sources"]):
        entry = release.load(layer, t)
        assert _same_weights(entry.sae, KSparseAutoencoder.from_pretrained(src.sae))
        assert _same_weights(entry.diffc, DiffC.from_pretrained(src.diffc))
        original = NeuronAtlas.load(src.atlas)
        assert torch.equal(entry.atlas.stats["top_image_ids"], original.stats["top_image_ids"])
        assert entry.atlas.top_images(entry.atlas.sorted_neurons()[0], 1)[0][0].size == (128, 128)
        assert entry.metrics["sae"]["fvu"] == pytest.approx(artifacts["measured"][(layer, t)]["sae"]["fvu"])
        sae, diffc, atlas = entry  # tuple-style unpacking
        assert atlas is entry.atlas
    # Each model folder stays a standalone mixin folder, without the trainer's checkpoints.
    sae = KSparseAutoencoder.from_pretrained(release_dir, subfolder="up_ft0/t100/sae")
    assert sae.recipe["layer"] == "up_ft0"
    assert not (release_dir / "bottleneck" / "t25" / "sae" / "checkpoint").exists()
    assert (release_dir / "bottleneck" / "t25" / "sae" / "eval.json").is_file()
    # The embedded backbone comes back under the recipes' name, so the SAEs accept its features.
    backbone = release.load_backbone()
    assert backbone.name == BACKBONE_NAME
    release.load("bottleneck", 25).sae.check_recipe(backbone.recipe("bottleneck", 25))
    assert [caption for _, caption in release.examples] == CLASSES
    assert all(Path(path).is_file() for path, _ in release.examples)


def test_card_metadata_holds_the_measured_metrics_and_snippet_runs(artifacts, release_dir, capsys):
    from huggingface_hub import ModelCard

    card = ModelCard.load(release_dir / "README.md")
    data = card.data
    assert data.library_name == "revelio-hub"
    assert data.license == "apache-2.0" and data.datasets == ["test/colours"]
    assert "sparse-autoencoder" in data.tags
    values = {r.metric_name: r.metric_value for r in data.eval_results}
    for (layer, t), measured in artifacts["measured"].items():
        where = f"({layer}, t={t})"
        assert values[f"k-SAE FVU {where}"] == pytest.approx(measured["sae"]["fvu"], abs=1e-6)
        assert values[f"k-SAE L0 {where}"] == pytest.approx(measured["sae"]["l0"], abs=1e-6)
        assert values[f"k-SAE dead fraction {where}"] == pytest.approx(measured["sae"]["dead_fraction"], abs=1e-6)
        assert values[f"Diff-C top-1 accuracy {where}"] == pytest.approx(measured["diffc"]["top1"], abs=1e-6)
        sigma = [v for k, v in values.items() if k.startswith("sigma_label") and k.endswith(where)]
        expected = measured["atlas"].get("sigma_label")
        assert sigma == ([pytest.approx(expected, abs=1e-6)] if expected is not None else [])
    # The figure exists and the card points at it; the table lists every entry.
    assert (release_dir / "figures" / "metrics.png").is_file()
    assert "(figures/metrics.png)" in card.text
    assert "| `up_ft0` | 100 |" in card.text
    # The loading snippet works as written (with the repo id pointed at the local folder).
    code = re.search(r"```python\n(.*?)```", card.text, re.DOTALL).group(1)
    assert f'"{REPO}"' in code
    exec(compile(code.replace(f'"{REPO}"', repr(str(release_dir))), "card-snippet", "exec"), {})
    printed = capsys.readouterr().out
    assert "fires on" in printed or "dead neuron" in printed


def test_publish_and_load_one_entry_from_the_hub(release_dir, hub, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    url = push_release(release_dir, REPO, private=True)
    assert REPO in url
    info = HfApi().model_info(REPO)
    assert info.private
    remote_files = {s.rfilename for s in info.siblings}
    local_files = {p.relative_to(release_dir).as_posix() for p in release_dir.rglob("*") if p.is_file()}
    assert local_files <= remote_files

    release = Release.from_pretrained(REPO)
    assert release.entries == ENTRIES and release.remote and len(release.revision) == 40
    assert set(hub.downloaded(REPO)) == {"release.json", "README.md"}
    entry = release.load("bottleneck", 25)
    assert entry.sae.n_latents == entry.atlas.num_neurons
    assert entry.atlas.top_images(entry.atlas.sorted_neurons()[0], 2)[0][0].size == (128, 128)
    fetched = set(hub.downloaded(REPO))
    assert any(p.startswith("bottleneck/t25/atlas/thumbnails/") for p in fetched)
    assert not any(p.startswith(("up_ft0/", "backbone/", "examples/")) for p in fetched)
    snapshot = release.path
    assert (snapshot / "bottleneck" / "t25" / "sae" / "model.safetensors").is_file()
    assert not (snapshot / "up_ft0").exists()  # the other entry is not in the cache

    # Loading again is served from the cache; the card parses back from the Hub.
    before = len(hub.downloaded(REPO))
    Release.from_pretrained(REPO).load("bottleneck", 25)
    assert len(hub.downloaded(REPO)) == before
    assert ModelCard.load(REPO).data.library_name == "revelio-hub"
    # Standalone SAE from a subfolder of the remote repo; anonymous access to the private repo is refused.
    sae = KSparseAutoencoder.from_pretrained(REPO, subfolder="up_ft0/t100/sae")
    assert sae.recipe["timestep"] == 100
    with pytest.raises(ValueError, match="neither a local folder nor a Hub repo"):
        Release.from_pretrained(REPO, token=False, cache_dir=tmp_path / "anonymous-cache")

    # Offline (HF_HUB_OFFLINE=1), the cached entry still loads; an entry never fetched says why it cannot.
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    offline = Release.from_pretrained(REPO)
    assert offline.revision == release.revision
    assert offline.load("bottleneck", 25).sae.n_latents == entry.sae.n_latents
    with pytest.raises(ValueError, match="not in the local cache"):
        offline.load("up_ft0", 100)


def test_make_release_cli_from_config(artifacts, tmp_path, hub):
    import runpy

    main = runpy.run_path(str(Path(__file__).parents[1] / "training" / "make_release.py"))["main"]

    config = {
        "entries": [{"sae": str(s.sae), "diffc": str(s.diffc), "atlas": str(s.atlas)} for s in artifacts["sources"]],
        "embed_backbone": str(artifacts["backbone_dir"]),
        "dataset": "test/colours",
        "examples": [str(p) for p, _ in artifacts["examples"]],
    }
    config_file = tmp_path / "release_config.json"
    config_file.write_text(json.dumps(config))
    out = tmp_path / "cli-release"
    assert main(["--config", str(config_file), "--out", str(out), "--push", "me/cli", "--private"]) == 0
    release = Release.from_pretrained("me/cli")
    assert release.entries == ENTRIES and release.embedded_backbone == "backbone"
    assert "me/cli" in release.card
    # Per-entry flags build the same release without a config file.
    s = artifacts["sources"][0]
    out2 = tmp_path / "flags-release"
    assert main(["--sae", str(s.sae), "--atlas", str(s.atlas), "--backbone", BACKBONE_NAME, "--out", str(out2)]) == 0
    assert Release.from_pretrained(out2).load("bottleneck", 25).diffc is None


def test_broken_releases_name_the_broken_file(release_dir, tmp_path):
    def fresh() -> Path:
        target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(release_dir, target)
        return target

    folder = fresh()
    (folder / "release.json").write_text('{"entries": [')
    with pytest.raises(ValueError, match="release.json is not valid JSON"):
        Release.from_pretrained(folder)

    folder = fresh()
    (folder / "release.json").unlink()
    with pytest.raises(FileNotFoundError, match="release.json is missing"):
        Release.from_pretrained(folder)

    folder = fresh()
    (folder / "bottleneck" / "t25" / "sae" / "model.safetensors").unlink()
    release = Release.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match=r"bottleneck/t25/sae/model\.safetensors is missing"):
        release.load("bottleneck", 25)
    release.load("up_ft0", 100)  # the other entry is unaffected

    folder = fresh()
    weights = folder / "up_ft0" / "t100" / "diffc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"up_ft0/t100/diffc/model\.safetensors is corrupt or truncated"):
        Release.from_pretrained(folder).load("up_ft0", 100)

    folder = fresh()
    (folder / "bottleneck" / "t25" / "atlas" / "stats.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"bottleneck/t25/atlas/stats\.safetensors is missing"):
        Release.from_pretrained(folder).load("bottleneck", 25)

    release = Release.from_pretrained(release_dir)
    with pytest.raises(ValueError, match=r"offers: \(bottleneck, 25\), \(up_ft0, 100\)"):
        release.load("up_ft2", 25)
    with pytest.raises(ValueError, match="owner/name"):
        Release.from_pretrained(tmp_path / "does-not-exist")


def test_assemble_refuses_inconsistent_inputs(artifacts, tmp_path):
    s0, s1 = artifacts["sources"]
    with pytest.raises(ValueError, match="listed twice"):
        assemble_release(tmp_path / "a", [s0, EntrySource(sae=s0.sae)])
    with pytest.raises(ValueError, match=r"Diff-C was trained on \(up_ft0, 100\)"):
        assemble_release(tmp_path / "b", [EntrySource(sae=s0.sae, diffc=s1.diffc)])
    with pytest.raises(ValueError, match="recipes name"):
        assemble_release(tmp_path / "c", [s0], backbone="someone/else")
    with pytest.raises(FileNotFoundError, match="config.json"):
        assemble_release(tmp_path / "d", [EntrySource(sae=tmp_path)])
    assemble_release(tmp_path / "e", [s0])
    with pytest.raises(ValueError, match="not empty"):
        assemble_release(tmp_path / "e", [s0])
    assemble_release(tmp_path / "e", [s1], overwrite=True)
    assert Release.from_pretrained(tmp_path / "e").entries == [ENTRIES[1]]
    with pytest.raises(ValueError, match="not a release folder"):
        assemble_release(tmp_path / "e" / "up_ft0", [s0], overwrite=True)


def _cli_main():
    import runpy

    return runpy.run_path(str(Path(__file__).parents[1] / "training" / "make_release.py"))["main"]


def _refused(main, argv, capsys, pattern: str) -> None:
    """``main(argv)`` stops with argparse's convention: exit status 2 and one line naming the problem."""
    import re

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("make_release.py: error: ") and re.search(pattern, err), err


def test_make_release_checks_inputs_before_writing(artifacts, tmp_path, capsys):
    main = _cli_main()
    s = artifacts["sources"][0]
    out = tmp_path / "releases" / "mine"
    out.parent.mkdir()
    flags = ["--sae", str(s.sae), "--atlas", str(s.atlas), "--out", str(out)]
    _refused(main, flags + ["--examples", str(tmp_path / "my_examples" / "*.jpg")], capsys,
             r"my_examples/\*\.jpg does not exist \(a shell pattern")
    assert not out.exists() and list((tmp_path / "releases").iterdir()) == []  # nothing half-written
    _refused(main, ["--sae", str(s.sae), "--atlas", str(tmp_path / "nope"), "--out", str(out)], capsys,
             "atlas folder .*nope does not exist")
    assert not out.exists()
    # the same command with good inputs then works, without --overwrite
    good = [str(p) for p, _ in artifacts["examples"]]
    assert main(flags + ["--examples", *good]) == 0
    assert [c for _, c in Release.from_pretrained(out).examples] == [Path(p).stem for p in good]
    # a failing --overwrite run leaves the existing release as it was
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    _refused(main, flags + ["--overwrite", "--examples", str(tmp_path / "missing.png")], capsys, "does not exist")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in (tmp_path / "releases").iterdir()] == ["mine"]
    assert main(flags + ["--overwrite", "--examples"]) == 0  # --examples alone: no examples
    assert Release.from_pretrained(out).examples == []


def test_make_release_checks_local_folders_before_opening_the_dataset(artifacts, tmp_path, hub, capsys):
    """A mistyped --sae fails at once: --dataset (default examples from the Hub) is not opened first."""
    main = _cli_main()
    s = artifacts["sources"][0]
    before = len(hub.requests)
    _refused(main, ["--sae", str(tmp_path / "no-such-sae"), "--atlas", str(s.atlas), "--out", str(tmp_path / "r"),
                    "--dataset", "me/some-dataset"], capsys, "no-such-sae")
    assert len(hub.requests) == before  # no Hub request at all
    assert not (tmp_path / "r").exists()


def test_card_metadata_names_hub_ids_only(tmp_path):
    from huggingface_hub import ModelCard

    local_backbone = tmp_path / "my-backbone"
    local_backbone.mkdir()
    local_data = tmp_path / "my-images"
    local_data.mkdir()
    recipe = {"backbone": str(local_backbone), "layer": "bottleneck", "timestep": 25, "image_size": 32, "d_in": 8}
    sae_dir = tmp_path / "sae"
    KSparseAutoencoder(d_in=8, n_latents=32, k=4, recipe=recipe).save_pretrained(sae_dir)

    out = assemble_release(tmp_path / "r1", [EntrySource(sae=sae_dir)], dataset=str(local_data))
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert str(tmp_path) not in front and "base_model" not in front and "datasets:" not in front
    assert str(tmp_path) not in card  # the body names local folders by their name only
    assert "my-backbone (a local folder)" in card

    out = assemble_release(tmp_path / "r2", [EntrySource(sae=sae_dir)], dataset=str(local_data),
                           base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", dataset_id="timm/oxford-iiit-pet")
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data.datasets == ["timm/oxford-iiit-pet"]
    with pytest.raises(ValueError, match="must be a Hub repo id"):
        assemble_release(tmp_path / "r3", [EntrySource(sae=sae_dir)], base_model=str(local_backbone))
    assert not (tmp_path / "r3").exists()


def test_relative_release_path_from_another_directory_says_no_such_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no local folder 'releases/toy-shapes' \(looked for .*releases/toy-shapes\)"):
        Release.from_pretrained("releases/toy-shapes")


def test_card_says_how_claims_were_checked_with_the_atlas_stored_settings(release_dir):
    """The card's calibration paragraph is read from each atlas' stored claim table, not written from defaults."""
    from revelio_hub.cards import render_card

    config = json.loads((release_dir / "release.json").read_text())
    stored = config["entries"][0]["metrics"]["atlas"]["claim_calibration"]
    atlas_table = json.loads((release_dir / config["entries"][0]["path"] / "atlas" / "atlas.json").read_text())
    assert stored["version"] == atlas_table["claim_calibration"]["version"]
    assert stored["regimes"] == atlas_table["claim_calibration"]["config"]["regimes"]
    text = render_card(config).text
    lo, hi = stored["regimes"][1], stored["regimes"][0]
    assert f"cut into {stored['folds']} parts" in text and f"at least {hi:g} × its mean" in text
    assert f"Weaker firings ({lo:g}–{hi:g}× its mean)" in text
    assert "is summarised from the strongest of these checks that was measured" in text
    assert f"images it fires {lo:g}–{hi:g}× its usual on" in text
    for e in config["entries"]:  # other settings: the card follows them
        e["metrics"]["atlas"]["claim_calibration"] = {**stored, "folds": 4, "regimes": [2.0], "min_precision": 0.95}
    text = render_card(config).text
    assert "cut into 4 parts" in text and "at least 2 × its mean" in text and "at least 95%" in text
    assert "Weaker firings" not in text and "fires more weakly, the app names nothing" in text
    assert "strongest of these checks" not in text
    for e in config["entries"]:
        e["metrics"]["atlas"].pop("claim_calibration")
    assert "were not checked on held-out images" in render_card(config).text
