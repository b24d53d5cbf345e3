"""k-SAE: model API, loading, import of the original Revelio code's checkpoints, sparse kernels and the trainer (offline, CPU, seconds)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from revelio_hub.recipe import FeatureRecipe
from revelio_hub.sae.model import KSparseAutoencoder
from revelio_hub.sae.kernels import sparse_decode, topk_encode
from revelio_hub.sae.training import SAETrainConfig, evaluate_sae, sample_tokens, train_sae
from process_group import run_group


pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(d_in=16, layer="up_ft1", granularity="pooled"):
    return FeatureRecipe(backbone="toy", layer=layer, timestep=25, image_size=64, d_in=d_in, granularity=granularity).to_dict()


def _sparse_data(n, d, m, seed=0, low=4, high=8):
    """Samples from a known dictionary: m unit atoms in d dims, low..high active, positive coefficients."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    n_active = torch.randint(low, high + 1, (n,), generator=g)
    scores = torch.rand(n, m, generator=g)
    threshold = scores.sort(1).values.gather(1, (m - n_active)[:, None])
    coef = (0.5 + torch.rand(n, m, generator=g)) * (scores >= threshold)
    return coef @ atoms, atoms


def _model(d_in=16, n_latents=64, k=4, **kw):
    torch.manual_seed(0)
    m = KSparseAutoencoder(d_in, n_latents, k=k, **kw)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.1)
        m.b_pre.normal_(0, 0.1)
    return m


# ---------------------------------------------------------------- model API


def test_encode_decode_shapes_and_sparse_decode_matches_dense():
    sae = _model()
    x = torch.randn(5, 16)
    vals, idx = sae.encode(x)
    assert vals.shape == idx.shape == (5, 4)
    assert (vals >= 0).all() and (vals[:, :-1] >= vals[:, 1:]).all()  # ReLU, sorted
    dense = sae.encode_dense(x)
    assert dense.shape == (5, 64) and ((dense != 0).sum(1) <= 4).all()
    recon, v2, i2 = sae(x)
    assert torch.allclose(recon, dense @ sae.W_dec + sae.b_pre, atol=1e-6)
    assert torch.equal(v2, vals) and torch.equal(i2, idx)

    # maps are encoded per position: N×d×H×W -> N×H×W×k, identical to encoding each vector
    maps = torch.randn(2, 16, 3, 5)
    mv, mi = sae.encode(maps)
    assert mv.shape == (2, 3, 5, 4)
    pv, pi = sae.encode(maps[1, :, 2, 4][None])
    assert torch.allclose(mv[1, 2, 4], pv[0]) and torch.equal(mi[1, 2, 4], pi[0])
    rmap, _, _ = sae(maps)
    assert rmap.shape == maps.shape
    assert torch.allclose(rmap[1, :, 2, 4], sae(maps[1, :, 2, 4][None])[0][0], atol=1e-6)
    assert sae.encode_dense(maps).shape == (2, 64, 3, 5)


def test_image_activations_respect_granularity_and_heat_maps():
    maps = torch.randn(3, 16, 4, 4)
    pooled = _model(granularity="pooled")
    assert torch.allclose(pooled.image_activations(maps), pooled.encode_dense(maps.mean((2, 3))))

    token = _model(granularity="token")
    acts = token.image_activations(maps)
    per_pos = token.encode_dense(maps)  # N×n×H×W
    assert torch.allclose(acts, per_pos.amax(dim=(2, 3)))

    heat = token.activation_map(maps, [3, 7, 3])
    assert heat.shape == (3, 3, 4, 4)
    assert torch.allclose(heat[:, 0], per_pos[:, 3]) and torch.allclose(heat[:, 1], per_pos[:, 7])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        token.activation_map(maps, [64])


def test_wrong_inputs_and_recipes_fail_clearly():
    sae = KSparseAutoencoder(16, 64, k=4, recipe=_recipe(16))
    with pytest.raises(ValueError, match=r"d_in=16.*'toy' layer 'up_ft1' at t=25.*got 8 channels"):
        sae.encode(torch.randn(2, 8))
    with pytest.raises(ValueError, match="N×16 or N×16×H×W"):
        sae.encode(torch.randn(16))
    sae.check_recipe(_recipe(16, granularity="token"))  # granularity is not identity
    with pytest.raises(ValueError, match="layer: expected 'up_ft1', got 'bottleneck'"):
        sae.check_recipe(_recipe(16, layer="bottleneck"))
    with pytest.raises(ValueError, match="expects d_in=16.*d_in=8"):
        sae.check_recipe(FeatureRecipe(backbone="toy", layer="up_ft1", timestep=25, image_size=64, d_in=8))
    with pytest.raises(ValueError, match="granularity"):
        KSparseAutoencoder(16, 64, k=4, granularity="spatial")
    with pytest.raises(ValueError, match="k must lie"):
        KSparseAutoencoder(16, 64, k=65)
    with pytest.raises(ValueError, match="recipe d_in=8"):
        KSparseAutoencoder(16, 64, recipe=_recipe(8))


def test_save_load_round_trip_exact_and_subfolder(tmp_path):
    sae = _model(recipe=_recipe(16), input_norm={"scale": 0.5}, granularity="token")
    sae.save_pretrained(tmp_path / "rel" / "up_ft1" / "t25" / "sae")
    cfg = json.loads((tmp_path / "rel/up_ft1/t25/sae/config.json").read_text())
    assert cfg["d_in"] == 16 and cfg["n_latents"] == 64 and cfg["k"] == 4 and cfg["granularity"] == "token"
    assert cfg["recipe"]["layer"] == "up_ft1" and cfg["input_norm"] == {"scale": 0.5}

    for loaded in (
        KSparseAutoencoder.from_pretrained(tmp_path / "rel/up_ft1/t25/sae"),
        KSparseAutoencoder.from_pretrained(tmp_path / "rel", subfolder="up_ft1/t25/sae"),
    ):
        for name, tensor in sae.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), name
        assert loaded.recipe == sae.recipe and loaded.granularity == "token" and loaded.scale == 0.5
        x = torch.randn(4, 16)
        assert torch.equal(loaded(x)[0], sae(x)[0])
    as_object = KSparseAutoencoder(16, 64, k=4, recipe=FeatureRecipe.from_dict(_recipe(16)))
    as_object.save_pretrained(tmp_path / "obj")
    assert KSparseAutoencoder.from_pretrained(tmp_path / "obj").recipe == _recipe(16)
    with pytest.raises(ValueError, match="No k-SAE"):
        KSparseAutoencoder.from_pretrained(tmp_path / "rel", subfolder="up_ft1/t100/sae")


def test_strict_loading_rejects_missing_and_extra_tensors(tmp_path):
    sae = _model()
    sae.save_pretrained(tmp_path / "sae")
    weights = tmp_path / "sae" / "model.safetensors"
    state = load_file(str(weights))

    extra = dict(state, stray=torch.zeros(2))
    save_file(extra, str(weights))
    with pytest.raises(ValueError, match=r"unexpected tensors \['stray'\]"):
        KSparseAutoencoder.from_pretrained(tmp_path / "sae")

    missing = {k: v for k, v in state.items() if k != "b_enc"}
    save_file(missing, str(weights))
    with pytest.raises(ValueError, match=r"missing tensors \['b_enc'\]"):
        KSparseAutoencoder.from_pretrained(tmp_path / "sae")

    state["W_dec"] = torch.zeros(32, 16)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="does not match its config.json"):
        KSparseAutoencoder.from_pretrained(tmp_path / "sae")


def _original_config_module():
    """A stand-in for the paper's ``SD-kSAE/training/config.py``: same module path, class name and fields.

    Pickle records a class by ``module.qualname``, so a file written with this
    class is byte-for-byte what the original Revelio code's ``save_model`` writes for the same values.
    """
    import dataclasses
    import types
    from typing import Optional

    @dataclasses.dataclass
    class SDSAERunnerConfig:  # fields, defaults and __post_init__ effects as in the original Revelio code (wandb left out)
        image_size: int = 512,  # noqa: the original Revelio code's trailing comma makes these tuples
        num_sampling_steps: int = 25,
        vae: str = "mse"
        model_name: str = "openai/clip-vit-base-patch32"
        model_name_proc: str = "openai/clip-vit-base-patch32"
        timestep: int = 0
        module_name: str = "mid_block"
        feature_dir: str = None
        layer_name: str = None
        block_layer: int = 10
        dataset_name: str = "evanarlian/imagenet_1k_resized_256"
        use_cached_activations: bool = False
        block_name: str = "mid_block"
        image_key: str = "image"
        d_in: int = 768
        k: int = 32
        total_training_tokens: int = 2_000_000
        device: str = "cpu"
        seed: int = 42
        dtype: torch.dtype = torch.float32
        b_dec_init_method: str = "mean"
        expansion_factor: int = 4
        from_pretrained_path: Optional[str] = None
        lr: float = 3e-4
        lr_scheduler_name: str = "constant"
        lr_warm_up_steps: int = 500
        batch_size: int = 4096
        sae_batch_size: int = 1024,
        dead_feature_threshold: float = 1e-8
        log_to_wandb: bool = True
        wandb_project: str = "revelio"
        wandb_entity: str = None
        wandb_log_frequency: int = 10
        checkpoint_path: str = "checkpoints"
        max_batch_size: int = 32
        save_path: str = "feature"

        def __post_init__(self):
            self.d_sae = self.d_in * self.expansion_factor
            self.run_name = f"{self.d_sae}-LR-{self.lr}-Tokens-{self.total_training_tokens:3.3e}"
            self.device = torch.device(self.device)
            self.checkpoint_path = f"{self.checkpoint_path}/abcd1234"

    SDSAERunnerConfig.__module__, SDSAERunnerConfig.__qualname__ = "training.config", "SDSAERunnerConfig"
    package, module = types.ModuleType("training"), types.ModuleType("training.config")
    module.SDSAERunnerConfig = SDSAERunnerConfig
    package.config = module
    return package, module


def _write_original_checkpoint(path, monkeypatch, d_in, expansion, k, g):
    """``KSparseAutoencoder.save_model`` of the original Revelio code: ``torch.save({"cfg": cfg, "state_dict": sd})``."""
    package, module = _original_config_module()
    monkeypatch.setitem(sys.modules, "training", package)
    monkeypatch.setitem(sys.modules, "training.config", module)
    cfg = module.SDSAERunnerConfig(d_in=d_in, expansion_factor=expansion, k=k, timestep=25, log_to_wandb=False,
                                   model_name="pets/SDv1-5/timestep_25/mid_block", device="cpu")
    n = cfg.d_sae

    class OriginalSAE(torch.nn.Module):  # parameters registered in the original Revelio code's order
        def __init__(self):
            super().__init__()
            self.W_enc = torch.nn.Parameter(torch.randn(d_in, n, generator=g))
            self.b_enc = torch.nn.Parameter(torch.randn(n, generator=g) - 6.0)  # pushes some top-k values below 0
            self.W_dec = torch.nn.Parameter(torch.randn(n, d_in, generator=g))  # rows not unit-norm
            self.b_dec = torch.nn.Parameter(torch.randn(d_in, generator=g))

    sae = OriginalSAE()
    torch.save({"cfg": cfg, "state_dict": sae.state_dict()}, path)
    monkeypatch.delitem(sys.modules, "training.config")  # reading must not need the original Revelio code's code
    monkeypatch.delitem(sys.modules, "training")
    return {name: p.detach() for name, p in sae.named_parameters()}


def test_original_checkpoint_import_reproduces_its_formula(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    d_in, k = 12, 5
    path = tmp_path / "final_k_sparse_autoencoder.pt"
    original_state = _write_original_checkpoint(path, monkeypatch, d_in, 4, k, g)
    x = torch.randn(20, d_in, generator=g)

    # the original Revelio code's formula, written out: TopK without ReLU, dense decode
    pre = (x - original_state["b_dec"]) @ original_state["W_enc"] + original_state["b_enc"]
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    original_recon = z @ original_state["W_dec"] + original_state["b_dec"]
    assert (top.values < 0).any(), "test data should exercise negative top-k values"

    exact = KSparseAutoencoder.from_original_checkpoint(path)  # relu=False: the original Revelio code's activation; k from cfg
    assert (exact.k, exact.d_in, exact.n_latents) == (k, d_in, 4 * d_in)
    assert torch.allclose(exact(x)[0], original_recon, atol=1e-5)

    # with our ReLU the two agree exactly on samples whose top-k values are all positive
    ours = KSparseAutoencoder.from_original_checkpoint(path, relu=True)
    positive = (top.values > 0).all(1)
    assert positive.any() and not positive.all()
    assert torch.allclose(ours(x)[0][positive], original_recon[positive], atol=1e-5)
    assert not torch.allclose(ours(x)[0][~positive], original_recon[~positive], atol=1e-3)

    from revelio_hub.sae.model import read_original_checkpoint

    cfg = read_original_checkpoint(path)["cfg"]
    assert type(cfg) is dict and cfg["k"] == k and cfg["timestep"] == 25 and cfg["device"] == torch.device("cpu")

    torch.save({"state_dict": {k_: v for k_, v in original_state.items() if k_ != "b_enc"}, "k": k}, path)
    with pytest.raises(ValueError, match="b_enc"):
        KSparseAutoencoder.from_original_checkpoint(path)


def test_original_checkpoint_refuses_other_pickled_objects(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = {"W_enc": torch.zeros(2, 4), "W_dec": torch.zeros(4, 2), "b_enc": torch.zeros(4), "b_dec": torch.zeros(2)}
    path = tmp_path / "evil.pt"
    torch.save({"cfg": Exploit(), "state_dict": state}, path)
    with pytest.raises(ValueError, match="not loaded.*weights_only"):
        KSparseAutoencoder.from_original_checkpoint(path)
    assert not marker.exists()

    import argparse

    # any other class (here training args, as training scripts often store) is not unpickled either
    torch.save({"cfg": argparse.Namespace(k=4), "state_dict": state}, path)
    with pytest.raises(ValueError, match="not loaded"):
        KSparseAutoencoder.from_original_checkpoint(path)


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("relu", [True, False])
def test_sparse_backward_equals_autograd(relu):
    g = torch.Generator().manual_seed(0)
    n, d, m, k, k_aux = 24, 10, 40, 4, 6
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)
    w_dec = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    dead = torch.rand(m, generator=g) < 0.3
    target = torch.randn(n, d, generator=g, dtype=torch.float64)

    def loss_of(vals, idx, aux_vals, aux_idx):
        recon = sparse_decode(vals, idx, w_dec)
        aux = sparse_decode(aux_vals, aux_idx, w_dec)
        return (recon - target).pow(2).sum() + 0.3 * (aux - target).pow(2).sum()

    vals, idx, aux_vals, aux_idx = topk_encode(x, w, b, k, relu=relu, aux_ids=torch.nonzero(dead).reshape(-1), k_aux=k_aux)
    loss_of(vals, idx, aux_vals, aux_idx).backward()
    ours = [t.grad.clone() for t in (x, w, b, w_dec)]
    for t in (x, w, b, w_dec):
        t.grad = None

    # reference: plain autograd through the dense pre-activations, same selections
    pre = F.linear(x, w, b)
    ref_vals = pre.gather(1, idx)
    ref_aux = pre.gather(1, aux_idx)
    assert torch.equal(aux_idx.sort(1).values, pre.masked_fill(~dead, float("-inf")).topk(k_aux).indices.sort(1).values)
    if relu:
        ref_vals, ref_aux = ref_vals.relu(), ref_aux.relu()
    assert torch.equal(idx.sort(1).values, pre.topk(k).indices.sort(1).values)
    assert dead[aux_idx].all()  # aux picks dead latents only
    assert torch.allclose(vals, ref_vals) and torch.allclose(aux_vals, ref_aux)
    loss_of(ref_vals, idx, ref_aux, aux_idx).backward()
    for mine, ref in zip(ours, (x.grad, w.grad, b.grad, w_dec.grad)):
        assert torch.allclose(mine, ref, atol=1e-10)


@pytest.mark.parametrize("relu", [True, False])
def test_dead_mask_selects_like_dead_ids(relu):
    """The sync-free mask form of the AuxK selection picks the same latents, values and gradients as the id form."""
    g = torch.Generator().manual_seed(1)
    n, d, m, k, k_aux = 16, 8, 30, 3, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(m, d, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    dead = torch.rand(m, generator=g) < 0.4
    grads = []
    for kwargs in ({"aux_ids": torch.nonzero(dead).reshape(-1)}, {"aux_mask": dead}):
        ws = w.clone().requires_grad_(True)
        vals, idx, aux_vals, aux_idx = topk_encode(x, ws, b, k, relu=relu, k_aux=k_aux, **kwargs)
        order = aux_idx.argsort(1)
        grads.append((aux_idx.gather(1, order), aux_vals.gather(1, order)))
        (aux_vals * torch.arange(1.0, k_aux + 1, dtype=torch.float64)[order.argsort(1)]).sum().backward()
    assert torch.equal(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])
    # fewer dead latents than k_aux: the spare slots are zero and carry no gradient
    few = torch.zeros(m, dtype=torch.bool)
    few[[2, 7]] = True
    ws = w.clone().requires_grad_(True)
    _, _, aux_vals, aux_idx = topk_encode(x, ws, b, k, relu=relu, k_aux=k_aux, aux_mask=few)
    spare = ~few[aux_idx]
    assert (aux_vals[spare] == 0).all() and spare.sum() == n * (k_aux - 2)
    aux_vals.sum().backward()
    assert torch.count_nonzero(ws.grad.abs().sum(1)) <= 2


def test_auxk_loss_is_normalised_by_the_centred_residual_variance():
    """OpenAI's normalized_mse: Σ‖e − ê‖² / Σ‖e − mean(e)‖²; a residual with a large mean does not shrink it."""
    from revelio_hub.sae.training import _auxk_loss

    g = torch.Generator().manual_seed(0)
    e = torch.randn(64, 5, generator=g) + 10.0  # large common offset
    e_hat = torch.randn(64, 5, generator=g)
    expected = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert _auxk_loss(e, e_hat, None, 1).item() == pytest.approx(expected.item(), rel=1e-5)
    # predicting the residual's batch mean scores exactly 1
    assert _auxk_loss(e, e.mean(0).expand_as(e), None, 1).item() == pytest.approx(1.0, rel=1e-5)


def test_dead_fraction_is_measured_over_all_rows_when_held_out_is_small():
    x, _ = _sparse_data(2048, 16, 64)
    cfg = SAETrainConfig(k=4, n_latents=64, batch_size=128, steps=30, lr=4e-3, warmup_steps=5, eval_fraction=0.01,
                         checkpoint_every=0, dead_eval_min_samples=1000)
    result = train_sae(x, cfg, progress=False)
    assert result.eval["dead_fraction_over"] == "all_rows" and result.eval["dead_fraction_samples"] == 2048
    model = result.model
    fired = torch.zeros(64, dtype=torch.bool)
    _, vals, idx = model(x)
    fired[idx[vals != 0]] = True
    assert result.eval["dead_fraction"] == pytest.approx(1 - fired.double().mean().item())
    assert "dead_fraction_held_out" in result.eval  # the small-sample figure is kept, labelled
    cfg.dead_eval_min_samples = 10
    assert train_sae(x, cfg, progress=False).eval["dead_fraction_over"] == "held_out"


def test_sample_tokens():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    tokens, image = sample_tokens(maps, 3, seed=0)
    assert tokens.shape == (6, 3) and image.tolist() == [0, 0, 0, 1, 1, 1]
    for t, i in zip(tokens, image):
        columns = maps[i].reshape(3, 4).t()
        assert any(torch.equal(t, c) for c in columns)
    assert len({tuple(t.tolist()) for t in tokens[:3]}) == 3  # distinct positions
    all_tokens, _ = sample_tokens(maps, 10)
    assert all_tokens.shape == (8, 3)
    assert torch.equal(sample_tokens(maps, 2, seed=5)[0], sample_tokens(maps, 2, seed=5)[0])


def test_deviation_sampling_spends_the_budget_on_positions_unlike_their_map():
    """A map of plain background with one "object" position: uniform draws find it once in 16 maps, deviation draws
    nearly always, still distinct positions and seeded; a map that is the same everywhere is still drawn from."""
    g = torch.Generator().manual_seed(0)
    maps = torch.ones(400, 3, 4, 4) + 0.01 * torch.randn(400, 3, 4, 4, generator=g)
    where = torch.randint(0, 16, (400,), generator=g)
    maps.view(400, 3, 16)[torch.arange(400), :, where] += 5.0  # the object, one position per map

    def object_share(sampling: str) -> float:
        tokens, image = sample_tokens(maps, 1, seed=3, sampling=sampling)
        return float((tokens[:, 0] > 3).float().mean())

    assert object_share("deviation") > 0.9 and object_share("uniform") < 0.15  # 0.94 and 1/16 expected
    tokens, image = sample_tokens(maps, 4, seed=3, sampling="deviation")
    per_image = tokens.view(400, 4, 3)
    assert all(len({tuple(t.tolist()) for t in per_image[i]}) == 4 for i in range(400))  # distinct positions
    assert torch.equal(tokens, sample_tokens(maps, 4, seed=3, sampling="deviation")[0])
    flat, _ = sample_tokens(torch.ones(2, 3, 4, 4), 4, sampling="deviation")
    assert flat.shape == (8, 3) and torch.isfinite(flat).all()
    with pytest.raises(ValueError, match="sampling must be one of uniform, deviation"):
        sample_tokens(maps, 2, sampling="norm")


# ---------------------------------------------------------------- training


def test_training_recovers_known_dictionary(tmp_path):
    x, atoms = _sparse_data(32768, 128, 256)
    cfg = SAETrainConfig(k=8, n_latents=512, batch_size=256, steps=700, lr=4e-3, warmup_steps=20, log_every=50,
                         eval_fraction=0.1, checkpoint_every=0)
    result = train_sae(x, cfg, out_dir=tmp_path / "sae", progress=False)
    best_cos = (atoms @ result.model.W_dec.detach().t()).max(1).values
    assert best_cos.mean() >= 0.9
    assert result.eval["fvu"] <= 0.1
    assert result.eval["l0"] <= 8
    # rows are renormalised before every step, as the original does: only the last Adam update is left
    assert (result.model.W_dec.norm(dim=1) - 1).abs().max() < 0.05
    # written next to the weights, and the saved model is the trained one
    saved = json.loads((tmp_path / "sae/eval.json").read_text())
    assert saved["fvu"] == pytest.approx(result.eval["fvu"]) and saved["n_samples"] == 3277
    loaded = KSparseAutoencoder.from_pretrained(tmp_path / "sae")
    assert evaluate_sae(loaded, x[:512])["fvu"] == pytest.approx(evaluate_sae(result.model, x[:512])["fvu"])
    lines = [json.loads(l) for l in (tmp_path / "sae/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(50, 701, 50))
    assert {"loss", "fvu", "l0", "dead_fraction", "aux_loss", "lr"} <= set(lines[0])


def test_auxk_revives_dead_latents():
    # 512 atoms, 512 latents, but three quarters of the encoder rows start 10× too small: under plain
    # TopK they never win a slot, receive no gradient and stay dead. AuxK trains them on the residual.
    x, _ = _sparse_data(16384, 64, 512, low=6, high=6)

    def bad_init(model):
        model.W_enc[model.n_latents // 4 :] *= 0.1

    dead = {}
    for coef in (0.0, 1 / 32):
        cfg = SAETrainConfig(k=8, n_latents=512, batch_size=256, steps=200, lr=4e-3, warmup_steps=10, log_every=10,
                             eval_fraction=0.1, auxk=True, aux_coef=coef, dead_window=2560, checkpoint_every=0)
        result = train_sae(x, cfg, progress=False, init_fn=bad_init)
        dead[coef] = (result.eval["dead_fraction_train"], result.eval["fvu"])
    assert dead[0.0][0] > 0.6  # plain TopK: most latents dead
    assert dead[1 / 32][0] < 0.2 * dead[0.0][0]  # AuxK revives most of them
    assert dead[1 / 32][1] < dead[0.0][1]


def _small_cfg(**kw):
    base = dict(k=4, n_latents=128, batch_size=64, steps=24, lr=2e-3, warmup_steps=4, log_every=4,
                eval_fraction=0.1, dead_window=128, checkpoint_every=5)
    base.update(kw)
    return SAETrainConfig(**base)


def test_resume_after_kill_equals_uninterrupted(tmp_path, capsys):
    x, _ = _sparse_data(1024, 16, 64)
    full = train_sae(x, _small_cfg(), out_dir=tmp_path / "full", progress=False)
    assert any(r["dead_fraction"] > 0 for r in full.history)  # AuxK is part of what must resume

    # "killed" after step 13: the last checkpoint is at step 10; the same call resumes from there
    partial = train_sae(x, _small_cfg(), out_dir=tmp_path / "run", progress=False, stop_after_step=13)
    assert partial.steps == 13 and partial.eval == {}
    assert not (tmp_path / "run/model.safetensors").exists()
    with pytest.raises(ValueError, match="different settings.*'lr'"):
        train_sae(x, _small_cfg(lr=1e-3), out_dir=tmp_path / "run", progress=False)
    capsys.readouterr()
    resumed = train_sae(x, _small_cfg(), out_dir=tmp_path / "run", progress=False)
    assert "resuming from step 10 of 24" in capsys.readouterr().err
    for name, tensor in full.model.state_dict().items():
        assert torch.allclose(tensor, resumed.model.state_dict()[name], atol=1e-6), name
    assert resumed.eval["fvu"] == pytest.approx(full.eval["fvu"], abs=1e-6)
    steps = [json.loads(l)["step"] for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]

    # finished: the resumable state is gone, the same command returns the saved result without training
    assert not (tmp_path / "run/checkpoint").exists()
    again = train_sae(x, _small_cfg(), out_dir=tmp_path / "run", progress=False)
    assert again.eval == pytest.approx(resumed.eval) and torch.equal(again.model.W_dec, resumed.model.W_dec)
    with pytest.raises(ValueError, match="finished run with different settings.*'lr'"):
        train_sae(x, _small_cfg(lr=1e-3), out_dir=tmp_path / "run", progress=False)
    short = train_sae(x, _small_cfg(lr=1e-3, steps=4), out_dir=tmp_path / "run", progress=False, overwrite=True)
    assert short.steps == 4 and json.loads((tmp_path / "run/train_config.json").read_text())["lr"] == 1e-3


def test_batch_larger_than_the_data_uses_the_whole_set_per_step(tmp_path, caplog):
    # as the original Revelio code's loader: every step sees all training samples; the step count is kept
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0)).relu()
    with caplog.at_level("WARNING", logger="revelio_hub.sae.training"):
        r = train_sae(x, _small_cfg(eval_fraction=0.1), out_dir=tmp_path / "run", progress=False)
    warning = [rec.getMessage() for rec in caplog.records if "exceeds" in rec.getMessage()]
    assert len(warning) == 1 and "\n" not in warning[0] and "the whole training set (36 samples" in warning[0]
    assert r.steps == 24 and r.eval["samples_seen"] == 24 * 36
    saved = json.loads((tmp_path / "run/train_config.json").read_text())
    assert (saved["batch_size"], saved["steps"]) == (36, 24)
    again = train_sae(x, _small_cfg(eval_fraction=0.1), out_dir=tmp_path / "run", progress=False)  # same command
    assert again.eval == r.eval


def test_trainer_input_errors():
    with pytest.raises(ValueError, match="N×d_in"):
        train_sae(torch.randn(40, 16, 2, 2), _small_cfg(), progress=False)
    with pytest.raises(ValueError, match="b_pre_init"):
        SAETrainConfig(b_pre_init="median")


_DP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from revelio_hub.distributed import finish
    from revelio_hub.sae.training import SAETrainConfig, train_sae
    acc = Accelerator(cpu=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g).relu()
    cfg = SAETrainConfig(k=4, n_latents=128, batch_size=64, steps=20, lr=2e-3, warmup_steps=4, log_every=4,
                         eval_fraction=0.1, dead_window=128, checkpoint_every=0)
    r = train_sae(x, cfg, accelerator=acc, progress=False)
    if acc.is_main_process:
        save_file(r.model.state_dict(), sys.argv[1])
        print("WORLD", acc.num_processes, "DEAD", max(h["dead_fraction"] for h in r.history))
    finish(acc)
    """
)


def test_two_process_data_parallel_matches_one_process(tmp_path):
    script = tmp_path / "dp.py"
    script.write_text(_DP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two.safetensors")],
                         env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "WORLD 1" in one.stdout and "WORLD 2" in two.stdout
    assert float(two.stdout.split("DEAD")[1].split()[0]) > 0  # the AuxK path (and its all-reduce) ran
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def _write_store(root, n=48, c=8, hw=4):
    from revelio_hub.features import FeatureStoreWriter

    g = torch.Generator().manual_seed(0)
    maps = torch.randn(n, c, hw, hw, generator=g).relu()
    header = {
        "recipe": {"backbone": "toy-backbone", "image_size": 32, "revision": None, "prompt": "", "noise_seed": 0,
                   "ensemble": 1, "family": "pixel"},
        "dataset": {"num_rows": n}, "label_column": "label", "class_names": ["a", "b"],
        "layers": ["bottleneck"], "timesteps": [25], "channels": {"bottleneck": c}, "views": 1, "spatial": True,
    }
    writer = FeatureStoreWriter(root, header)
    writer.initialize()
    ids = list(range(n))
    writer.write_chunk(ids, ids, [0] * n, [i % 2 for i in ids], {("bottleneck", 25): maps.mean((2, 3))},
                       {("bottleneck", 25): maps})
    writer.finalize()
    return maps


@pytest.mark.parametrize("granularity", ["pooled", "token"])
def test_cli_trains_from_a_feature_store(tmp_path, granularity, capsys):
    import importlib.util
    from pathlib import Path

    from revelio_hub.features import FeatureStore

    maps = _write_store(tmp_path / "store")
    spec = importlib.util.spec_from_file_location("train_ksae", Path(__file__).parents[1] / "training/train_ksae.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "sae"
    argv = ["--store", str(tmp_path / "store"), "--layer", "bottleneck", "--timestep", "25", "--granularity", granularity,
            "--tokens-per-image", "4", "--k", "2", "--expansion", "4", "--batch-size", "16", "--steps", "6",
            "--warmup-steps", "2", "--log-every", "3", "--eval-fraction", "0.05", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    sae = KSparseAutoencoder.from_pretrained(out)
    assert sae.granularity == granularity and sae.n_latents == 32
    assert sae.recipe["layer"] == "bottleneck" and sae.recipe["backbone"] == "toy-backbone"
    sae.check_recipe(FeatureStore(tmp_path / "store").recipe("bottleneck", 25))
    assert sae.image_activations(maps[:3]).shape == (3, 32)
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_samples"] == (10 if granularity == "token" else 2)  # 5% held out, at least 2
    assert cli.main(argv[:-5] + ["--k", "3", "--out", str(out), "--no-progress"]) == 2  # refuses other settings
    assert "different settings" in capsys.readouterr().err


def test_geometric_median_resists_outliers():
    from revelio_hub.sae.training import geometric_median

    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 1e-3], [1000.0, 0.0]])
    # the mean is dragged to x≈200; the geometric median stays with the bulk
    assert torch.allclose(geometric_median(x), torch.tensor([1.0, 0.0]), atol=1e-2)


def test_bf16_compute_path_trains_like_fp32():
    # the CUDA default (bf16 matmuls, fp32 master weights) exercised on CPU
    x, _ = _sparse_data(4096, 32, 64)
    fvu = {}
    for mp in ("no", "bf16"):
        cfg = SAETrainConfig(k=6, n_latents=128, batch_size=256, steps=80, lr=4e-3, warmup_steps=10, log_every=50,
                             eval_fraction=0.1, checkpoint_every=0, mixed_precision=mp)
        result = train_sae(x, cfg, progress=False)
        assert result.model.W_enc.dtype == torch.float32
        fvu[mp] = result.eval["fvu"]
    assert fvu["bf16"] < 0.5 and abs(fvu["bf16"] - fvu["no"]) < 0.05


def test_load_from_hub_id_and_subfolder(tmp_path, hub):
    """Against the loopback Hub in tests/hub_server.py, with the real huggingface_hub client."""
    from huggingface_hub import HfApi

    sae = _model(recipe=_recipe(16))
    sae.save_pretrained(tmp_path / "rel" / "up_ft1" / "t25" / "sae")
    sae.save_pretrained(tmp_path / "single")
    (tmp_path / "rel" / "other_entry.bin").write_bytes(b"0" * 1000)
    api = HfApi()
    for repo, folder in (("me/rel", "rel"), ("me/sae", "single")):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=str(tmp_path / folder))
    hub.requests.clear()
    from_sub = KSparseAutoencoder.from_pretrained("me/rel", subfolder="up_ft1/t25/sae", cache_dir=tmp_path / "c")
    from_root = KSparseAutoencoder.from_pretrained("me/sae", cache_dir=tmp_path / "c")
    fetched = [str(r) for r in hub.requests if "/resolve/" in str(r)]
    x = torch.randn(3, 16)
    for loaded in (from_sub, from_root):
        assert torch.equal(loaded(x)[0], sae(x)[0]) and loaded.recipe == sae.recipe
    assert not any("other_entry" in r for r in fetched)


def test_paper_recipe_init_forward_loss_and_warmup_follow_the_original_formulas(tmp_path):
    """`recipe="paper"` against formulas written from the paper and the original Revelio code's behaviour:
    two separate Kaiming-uniform matrices (bounds √(6/n) and √(6/d_in), decoder rows unit-norm), b_pre at the
    data mean, b_enc 0; TopK without ReLU and without input normalisation; loss
    mean((x̂ − x)²) / mean((x − mean_batch x)²); lr · min(1, (i + 2) / warmup); no AuxK, no hold-out."""
    g = torch.Generator().manual_seed(3)
    n, d_in, n_latents, k = 300, 16, 512, 8
    x = torch.randn(n, d_in, generator=g) * 3 + 5
    start = {}

    def keep_initial(model):
        start.update({name: t.detach().clone() for name, t in model.state_dict().items()})
        start["model"] = KSparseAutoencoder(d_in, n_latents, k=k, relu=model.relu, input_norm=model.input_norm)
        start["model"].load_state_dict(model.state_dict())

    cfg = SAETrainConfig(recipe="paper", k=k, n_latents=n_latents, steps=4, warmup_steps=4, log_every=1,
                         checkpoint_every=0)
    assert (cfg.normalize_input, cfg.relu, cfg.auxk, cfg.eval_fraction, cfg.init) == (False, False, False, 0.0,
                                                                                    "kaiming_uniform")
    res = train_sae(x, cfg, out_dir=tmp_path / "paper", progress=False, init_fn=keep_initial)

    # init: untied, uniform on the original's bounds, decoder rows unit-norm, b_pre = data mean, b_enc = 0
    w_enc, w_dec = start["W_enc"], start["W_dec"]
    enc_bound = (6 / n_latents) ** 0.5
    assert w_enc.abs().max() <= enc_bound and w_enc.std().item() == pytest.approx(enc_bound / 3**0.5, rel=0.03)
    assert not torch.allclose(w_enc, w_dec)
    assert torch.allclose(w_dec.norm(dim=1), torch.ones(n_latents), atol=1e-5)
    assert torch.allclose(start["b_pre"], x.mean(0), atol=1e-5) and not start["b_enc"].any()

    # forward: z = TopK(W_enc (x − b_pre) + b_enc) (negative values kept), x̂ = W_dec z + b_pre
    sae = start["model"]
    assert sae.input_norm is None and not sae.relu
    def formula(b_enc):
        pre = (x - start["b_pre"]) @ w_enc.T + b_enc
        vals, idx = pre.topk(k, dim=1)
        return torch.zeros(n, n_latents).scatter_(1, idx, vals) @ w_dec + start["b_pre"]

    expected = formula(start["b_enc"])
    assert torch.allclose(sae(x)[0], expected, atol=1e-4)
    with torch.no_grad():  # a negative bias makes TopK pick negative values, which the original keeps
        sae.b_enc.sub_(3.0)
    recon, got_vals, _ = sae(x)
    assert (got_vals < 0).any() and torch.allclose(recon, formula(start["b_enc"] - 3.0), atol=1e-4)

    # loss of the first step (the whole set is one batch): the original's normalised MSE
    loss = (expected - x).pow(2).mean() / (x - x.mean(0)).pow(2).mean()
    assert res.history[0]["loss"] == pytest.approx(float(loss), rel=1e-4)
    assert res.history[0]["aux_loss"] == 0
    # warm-up: its scheduler steps before the optimiser, so step i runs at lr · min(1, (i + 2) / 4)
    assert [r["lr"] for r in res.history] == pytest.approx([4e-4 * min(1, (i + 2) / 4) for i in range(4)])

    # recorded: the model's config, train_config.json and eval.json (with the original's logged quantities)
    saved = KSparseAutoencoder.from_pretrained(tmp_path / "paper")
    assert saved.training_recipe == "paper"
    assert json.loads((tmp_path / "paper/train_config.json").read_text())["recipe"] == "paper"
    ev = json.loads((tmp_path / "paper/eval.json").read_text())
    assert ev["recipe"] == "paper" and ev["n_train"] == n and ev["original_metrics_over"] == "train"
    dense_l0 = float(((x - saved.b_pre.detach()) @ saved.W_enc.detach().T + saved.b_enc.detach() > 0)
                     .sum(1).double().mean())
    assert ev["original_l0_dense_pre_topk"] == pytest.approx(dense_l0)
    assert ev["original_l0_dense_pre_topk"] > k  # dense pre-TopK activity, not the TopK code's L0


def test_paper_recipe_evaluates_on_a_separate_split(tmp_path):
    x, _ = _sparse_data(600, 16, 64)
    cfg = SAETrainConfig(recipe="paper", k=4, n_latents=64, steps=3, warmup_steps=2, checkpoint_every=0)
    res = train_sae(x[:500], cfg, eval_features=x[500:], progress=False)
    assert res.eval["n_train"] == 500 and res.eval["n_samples"] == 100
    assert res.eval["evaluated_on"] == "eval_split" and res.eval["original_metrics_over"] == "eval_split"
    expected = evaluate_sae(res.model, x[500:])
    assert res.eval["fvu"] == pytest.approx(expected["fvu"], rel=1e-6)
