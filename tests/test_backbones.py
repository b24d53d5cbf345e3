"""Backbones: what a user relies on when extracting diffusion features.

Tiny random models laid out like Hub repos (tests/tiny_models.py), offline, CPU.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from revelio_hub.backbones import (
    Backbone,
    BackboneNotFoundError,
    StableDiffusionBackbone,
    detect_family,
    image_noise,
    load_backbone,
)
from revelio_hub.recipe import FeatureRecipe

from tiny_models import BUILDERS

# Small inputs keep every test in seconds; sizes are multiples of each family's stride.
SIZES = {"sd15": 64, "sd21": 64, "sdxl": 64, "dit": 32, "pixart": 32, "pixel": 16}
FAMILY = {"sd15": "sd", "sd21": "sd", "sdxl": "sdxl", "dit": "dit", "pixart": "pixart", "pixel": "pixel"}


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the conditioning cache out of the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REVELIO_HUB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: str(build(root / name)) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def backbones(folders):
    return {name: load_backbone(path, image_size=SIZES[name]) for name, path in folders.items()}


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 40 + 7 * i, 56 - 3 * i
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", list(BUILDERS))
def test_family_detected_and_shapes_match_every_layer(backbones, folders, name):
    bb = backbones[name]
    assert isinstance(bb, Backbone)
    assert bb.family == FAMILY[name] == detect_family(folders[name])
    assert bb.num_train_timesteps == 1000
    assert bb.name == folders[name]
    feats = bb.extract(_images(2), bb.layers, 10)
    assert set(feats) == {(layer, 10) for layer in bb.layers}
    for (layer, _), value in feats.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert tuple(value.shape) == (2, *bb.feature_shape(layer)), layer
        assert torch.isfinite(value).all()
        assert bb.channels(layer) == value.shape[1]
    pooled = bb.extract(_images(2), bb.layers[-1], 10, pool="mean")[(bb.layers[-1], 10)]
    assert tuple(pooled.shape) == (2, bb.channels(bb.layers[-1]))
    torch.testing.assert_close(pooled, feats[(bb.layers[-1], 10)].mean(dim=(-2, -1)), rtol=1e-5, atol=1e-6)


def test_canonical_layer_names(backbones):
    assert backbones["sd15"].layers == [
        "down_ft0", "down_ft1", "down_ft2", "down_ft3", "bottleneck", "up_ft0", "up_ft1", "up_ft2", "up_ft3"]
    assert backbones["sdxl"].layers[:4] == ["down_ft0", "down_ft1", "down_ft2", "bottleneck"]
    assert backbones["dit"].layers == ["block0", "block1", "block2"]
    assert backbones["pixart"].layers == ["block0", "block1", "block2"]


def test_default_image_size_from_config_and_override(folders):
    assert load_backbone(folders["sd15"]).image_size == 16 * 8  # unet.sample_size × VAE factor
    assert load_backbone(folders["sd21"]).image_size == 24 * 8  # SD 2.1 (768 px) style
    assert load_backbone(folders["dit"]).image_size == 8 * 8  # transformer.sample_size × 8
    assert load_backbone(folders["pixel"]).image_size == 32  # pixel: unet.sample_size
    with pytest.raises(ValueError, match="multiple of 64"):
        load_backbone(folders["sd15"], image_size=100)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_backbone(folders["dit"], image_size=40)


def test_paper_shapes_of_sd_layers(backbones):
    bb = backbones["sd15"]  # 64 px -> 8×8 latents; SD1.5 layout halves 3 times
    assert bb.feature_shape("bottleneck") == (64, 1, 1)
    assert bb.feature_shape("up_ft1") == (64, 4, 4)
    assert bb.feature_shape("up_ft3") == (32, 8, 8)
    assert bb.feature_shape("down_ft0") == (32, 4, 4)


def test_missing_model_error_names_id_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone("no-such-org/no-such-diffusion-model")
    message = str(info.value)
    assert "no-such-org/no-such-diffusion-model" in message
    assert "local folder" in message and "Download it once" in message
    assert isinstance(info.value, ValueError)  # callers catching ValueError still see it
    with pytest.raises(BackboneNotFoundError, match="model_index.json"):
        load_backbone(str(tmp_path))
    with pytest.raises(BackboneNotFoundError, match="not an existing folder"):
        load_backbone(str(tmp_path / "missing" / "deeper" / "model"))


def test_unsupported_pipeline_lists_supported(folders, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(folders["pixel"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        load_backbone(str(folder))


def test_hub_download_fetches_only_needed_files():
    from revelio_hub.backbones.loading import allow_patterns

    patterns = allow_patterns("sd")
    assert "unet/diffusion_pytorch_model.safetensors" in patterns
    assert not any("safety_checker" in p or "fp16" in p or p.endswith((".bin", ".ckpt")) for p in patterns)
    assert not any(p.startswith("transformer/") for p in patterns)
    assert "text_encoder_2/model.safetensors" in allow_patterns("sdxl")
    assert "null_conditioning.safetensors" in allow_patterns("pixel")


def test_text_encoders_dropped_after_conditioning(backbones):
    from transformers import PreTrainedModel

    for name in ("sd15", "sdxl", "pixart"):
        assert not any(isinstance(v, PreTrainedModel) for v in vars(backbones[name]).values()), name


def test_recipe_describes_features(backbones, folders):
    bb = backbones["sd15"]
    recipe = bb.recipe("up_ft1", 25, ensemble=2, seed=3)
    assert isinstance(recipe, FeatureRecipe)
    assert (recipe.backbone, recipe.layer, recipe.timestep, recipe.image_size, recipe.d_in) == (
        folders["sd15"], "up_ft1", 25, 64, 64)
    assert (recipe.family, recipe.ensemble, recipe.noise_seed, recipe.prompt) == ("sd", 2, 3, "")


# --------------------------------------------------------------- correctness


def test_sd_features_match_a_hand_written_reference(backbones, folders):
    """Preprocess, VAE mode × scale, hashed noise, DDPM add_noise, empty prompt, full UNet, read mid_block."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    bb, folder = backbones["sd15"], folders["sd15"]
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(2)]
    got = bb.extract(images, ["bottleneck", "up_ft2"], 25, seed=7, image_ids=[5, 9])

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    with torch.no_grad():
        pixels = torch.stack([
            torch.tensor(np.array(im.resize((64, 64), Image.Resampling.BICUBIC))).permute(2, 0, 1).float()
            for im in images]) / 127.5 - 1
        latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.stack([image_noise(latents.shape[1:], 7, i, 25) for i in (5, 9)])
        noisy = sched.add_noise(latents, noise, torch.tensor([25, 25]))
        ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        context = text(ids)[0].expand(2, -1, -1)
        seen = {}
        h1 = unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))
        h2 = unet.up_blocks[2].register_forward_hook(lambda m, i, o: seen.__setitem__("up2", o))
        unet(noisy, torch.tensor([25, 25]), encoder_hidden_states=context)
        h1.remove(), h2.remove()
    torch.testing.assert_close(got[("bottleneck", 25)], seen["mid"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[("up_ft2", 25)], seen["up2"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sd15", "dit"])
def test_early_exit_equals_full_forward_and_skips_the_rest(backbones, name):
    bb = backbones[name]
    layer = "bottleneck" if name != "dit" else "block1"
    final = bb.denoiser.conv_out if name != "dit" else bb.denoiser.proj_out_2
    calls = []
    handle = final.register_forward_hook(lambda *a: calls.append(1))
    try:
        early = bb.extract(_images(1), [layer], 50)
        assert calls == []  # the tail of the network never ran
        bb.early_exit = False
        full = bb.extract(_images(1), [layer], 50)
        assert calls == [1]
    finally:
        bb.early_exit = True
        handle.remove()
    torch.testing.assert_close(early[(layer, 50)], full[(layer, 50)], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sd21", "pixart"])
def test_one_multi_layer_pass_equals_separate_passes(backbones, name):
    bb = backbones[name]
    layers = [bb.layers[0], bb.layers[len(bb.layers) // 2], bb.layers[-1]]
    together = bb.extract(_images(2), layers, [3, 400])
    for layer in layers:
        alone = bb.extract(_images(2), layer, [400, 3])
        for t in (3, 400):
            torch.testing.assert_close(together[(layer, t)], alone[(layer, t)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sd15", "dit", "pixel"])
def test_deterministic_whatever_the_batch_size(backbones, name):
    bb = backbones[name]
    images = _images(3)
    layer = bb.layers[-2]
    a = bb.extract(images, layer, 25, batch_size=1)[(layer, 25)]
    b = bb.extract(images, layer, 25, batch_size=3)[(layer, 25)]
    c = bb.extract(images, layer, 25, batch_size=2)[(layer, 25)]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_image_ids_seed_the_noise(backbones):
    bb = backbones["sd15"]
    images = _images(3)
    base = bb.extract(images, "bottleneck", 200, image_ids=[10, 11, 12])[("bottleneck", 200)]
    # Same image with the same id in another position / call: same features.
    moved = bb.extract([images[2], images[0]], "bottleneck", 200, image_ids=[12, 10])[("bottleneck", 200)]
    torch.testing.assert_close(moved[0], base[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved[1], base[0], rtol=1e-4, atol=1e-5)
    # Another id (or seed) draws other noise.
    other = bb.extract([images[0]], "bottleneck", 200, image_ids=[99])[("bottleneck", 200)]
    assert not torch.allclose(other[0], base[0])
    reseeded = bb.extract([images[0]], "bottleneck", 200, image_ids=[10], seed=1)[("bottleneck", 200)]
    assert not torch.allclose(reseeded[0], base[0])
    with pytest.raises(ValueError, match="image_ids"):
        bb.extract(images, "bottleneck", 200, image_ids=[1, 2])


def test_timestep_changes_features(backbones):
    bb = backbones["sd15"]
    out = bb.extract(_images(2), "up_ft1", [0, 25, 500])
    assert not torch.allclose(out[("up_ft1", 0)], out[("up_ft1", 25)])
    assert not torch.allclose(out[("up_ft1", 25)], out[("up_ft1", 500)])


def test_ensemble_is_the_mean_of_the_draws(backbones):
    bb = backbones["pixel"]
    images = _images(2)
    one = bb.extract(images, "up_ft1", 300, seed=4)[("up_ft1", 300)]
    two = bb.extract(images, "up_ft1", 300, seed=4, ensemble=2)[("up_ft1", 300)]
    assert not torch.allclose(one, two)
    latents = bb.encode(bb.preprocess(images))
    draws = [bb.features_at(latents, [0, 1], 300, ["up_ft1"], seed=4, member=m)["up_ft1"] for m in (0, 1)]
    torch.testing.assert_close(one, draws[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two, (draws[0] + draws[1]) / 2, rtol=1e-5, atol=1e-6)


def test_bad_layer_and_timestep_errors_list_valid_values(backbones):
    bb = backbones["sd15"]
    with pytest.raises(ValueError, match="up_ft1") as info:
        bb.extract(_images(1), "up_ft9", 25)
    assert "bottleneck" in str(info.value) and "up_ft9" in str(info.value)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        bb.extract(_images(1), "bottleneck", 1000)
    with pytest.raises(ValueError, match=r"0\.\.999"):
        bb.extract(_images(1), "bottleneck", -1)
    with pytest.raises(ValueError, match="block0, block1, block2"):
        backbones["dit"].recipe("bottleneck", 25)
    with pytest.raises(ValueError, match="pool"):
        bb.extract(_images(1), "bottleneck", 25, pool="max")


def test_accepts_pil_arrays_and_tensors_alike(backbones):
    bb = backbones["pixel"]
    img = _images(1)[0]
    arr = np.array(img)
    tensor = torch.from_numpy(arr).permute(2, 0, 1)
    outs = [bb.extract(x, "bottleneck", 25)[("bottleneck", 25)] for x in (img, arr, tensor, tensor.float() / 255)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_bf16_and_channels_last(folders):
    bb = load_backbone(folders["sd15"], dtype=torch.bfloat16, image_size=64, channels_last=True)
    out = bb.extract(_images(2), ["bottleneck", "up_ft1"], 25)
    ref = load_backbone(folders["sd15"], image_size=64).extract(_images(2), ["bottleneck"], 25)
    nhwc = load_backbone(folders["sd15"], image_size=64, channels_last=True).extract(_images(2), ["bottleneck"], 25)
    torch.testing.assert_close(nhwc[("bottleneck", 25)], ref[("bottleneck", 25)], rtol=1e-4, atol=1e-5)
    assert out[("bottleneck", 25)].dtype == torch.float32
    assert torch.isfinite(out[("up_ft1", 25)]).all()
    # bf16 keeps ~3 significant digits: close to fp32 in relative terms.
    err = (out[("bottleneck", 25)] - ref[("bottleneck", 25)]).norm() / ref[("bottleneck", 25)].norm()
    assert err < 0.1


def test_progress_bar(backbones, capsys):
    backbones["pixel"].extract(_images(3), "bottleneck", 25, batch_size=2, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_backbone_from_in_memory_components(folders):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    folder = folders["sd15"]
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    sched = PNDMScheduler.from_pretrained(folder, subfolder="scheduler")
    bb = StableDiffusionBackbone(unet, vae, sched, prompt_embeds=torch.zeros(1, 77, 32), image_size=64)
    assert bb.extract(_images(1), "bottleneck", 25)[("bottleneck", 25)].shape == (1, 64, 1, 1)
    with pytest.raises(ValueError, match="1×L×32"):
        StableDiffusionBackbone(unet, vae, sched, prompt_embeds=torch.zeros(1, 77, 16))


def test_sdxl_and_pixart_conditioning(backbones):
    sdxl = backbones["sdxl"]
    assert sdxl._added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    assert sdxl._added["text_embeds"].shape == (1, 32)
    assert sdxl._context.shape == (1, 77, 64)  # both encoders' penultimate states, concatenated
    pixart = backbones["pixart"]
    assert pixart.denoiser.use_additional_conditions
    assert pixart._context.shape == (1, 120, 16) and pixart._mask.sum() == 1  # "" is just </s>
    assert backbones["dit"].class_label == 1000


def test_hub_id_downloads_only_needed_components(folders, monkeypatch):
    import huggingface_hub

    calls = {}

    def fake_file(repo_id, filename, revision=None, **kw):
        calls["file"] = (repo_id, filename, revision)
        return f"{folders['sd15']}/{filename}"

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        calls["snapshot"] = (repo_id, revision, list(allow_patterns))
        return folders["sd15"]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    bb = load_backbone("someone/tiny-sd", revision="abc123", image_size=64)
    assert calls["file"] == ("someone/tiny-sd", "model_index.json", "abc123")
    repo, revision, patterns = calls["snapshot"]
    assert (repo, revision) == ("someone/tiny-sd", "abc123")
    assert "vae/diffusion_pytorch_model.safetensors" in patterns and "tokenizer/*.json" in patterns
    assert not any(p.startswith(("safety_checker", "feature_extractor", "text_encoder_2")) for p in patterns)
    assert (bb.name, bb.revision, bb.family) == ("someone/tiny-sd", "abc123", "sd")
    assert bb.recipe("bottleneck", 25).revision == "abc123"


def test_extract_pixels_matches_extract(backbones):
    bb = backbones["pixel"]
    images = _images(3)
    pixels = bb.preprocess(images)
    assert pixels.shape == (3, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    a = bb.extract(images, ["bottleneck", "up_ft2"], [5, 50], batch_size=2)
    b = bb.extract_pixels(pixels, ["bottleneck", "up_ft2"], [5, 50], batch_size=3)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="B×3×16×16"):
        bb.extract_pixels(torch.zeros(1, 3, 32, 32), "bottleneck", 5)


def test_compile_keeps_hooks_and_values(folders, monkeypatch):
    # backend="eager" traces with dynamo without a C++ toolchain: checks that compiling the
    # pieces inside each block leaves the block hooks (capture + early exit) working.
    import logging

    import torch._dynamo

    bb = load_backbone(folders["pixel"], image_size=16)
    before = bb.extract(_images(2), ["down_ft1", "bottleneck"], 25)
    # Same-class blocks of different shapes each need a compiled entry; with dynamo's limit below
    # their number, the rest would silently run eager (SD 1.5 has more resnet shapes than the default 8).
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        bb.compile(backend="eager")
        after = bb.extract(_images(2), ["down_ft1", "bottleneck"], 25)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert not [w for w in warnings if "recompile_limit" in w], warnings
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-6)


def test_missing_component_names_it(folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(folders["sd15"], folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BackboneNotFoundError, match="'vae'.*safetensors"):
        load_backbone(str(folder))


@pytest.mark.parametrize("name", ["sdxl", "pixart"])
def test_text_conditioning_cached_so_encoders_are_not_reloaded(folders, name, monkeypatch, tmp_path):
    from revelio_hub.backbones import loading

    monkeypatch.setenv("REVELIO_HUB_CACHE", str(tmp_path))
    first = load_backbone(folders[name], image_size=SIZES[name])
    assert len(list((tmp_path / "conditioning").glob("*.safetensors"))) == 1
    real_load = loading._load_component

    def no_text(folder, index, component, *args):
        assert not component.startswith(("text_encoder", "tokenizer")), component
        return real_load(folder, index, component, *args)

    monkeypatch.setattr(loading, "_load_component", no_text)
    second = load_backbone(folders[name], image_size=SIZES[name])
    for key, value in first.conditioning.items():
        torch.testing.assert_close(second.conditioning[key], value, rtol=0, atol=0)
    a = first.extract(_images(1), first.layers[1], 25)
    b = second.extract(_images(1), first.layers[1], 25)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="text_encoder"):  # another prompt is another cache entry
        load_backbone(folders[name], image_size=SIZES[name], prompt="a photo of the cat")
