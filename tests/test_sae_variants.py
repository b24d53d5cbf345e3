"""SAE variants (BatchTopK, Matryoshka, Multi-TopK), the default learning-rate rule and synthetic atoms (CPU, seconds)."""

import json

import pytest
import torch

from revelio_hub.sae.kernels import topk_encode
from revelio_hub.sae.model import KSparseAutoencoder
from revelio_hub.sae.schedule import auto_lr, auto_warmup
from revelio_hub.sae.synthetic import SyntheticAtoms, atom_mcc, make_synthetic
from revelio_hub.sae.training import SAETrainConfig, train_sae
from revelio_hub.sae.variants import VARIANTS, default_prefixes, encode_for_training
from revelio_hub.training_recipes import get_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


SPEC = SyntheticAtoms(d=16, n_atoms=32, min_active=2, max_active=4)


def _train(variant, tmp_path, steps=40, **kw):
    x, atoms = make_synthetic(SPEC, 4096)
    cfg = SAETrainConfig(k=4, n_latents=64, batch_size=256, steps=steps, lr=4e-3, warmup_steps=5, variant=variant,
                         eval_fraction=0.05, checkpoint_every=0, log_every=10, **kw)
    return train_sae(x, cfg, out_dir=tmp_path / variant, progress=False), x, atoms


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_saves_its_variant_and_round_trips_exactly(variant, tmp_path):
    result, x, atoms = _train(variant, tmp_path)
    model = result.model
    config = json.loads((tmp_path / variant / "config.json").read_text())
    assert config["variant"] == variant
    assert result.eval["variant"] == variant and result.eval["fvu"] < 0.9
    loaded = KSparseAutoencoder.from_pretrained(tmp_path / variant)
    assert loaded.variant == variant and loaded.prefixes == model.prefixes
    for a, b in zip(model(x[:64]), loaded(x[:64])):
        assert torch.equal(a, b)
    assert torch.equal(model.image_activations(x[:8]), loaded.image_activations(x[:8]))
    if variant == "batchtopk":
        assert float(loaded.threshold) > 0 and torch.equal(loaded.threshold, model.threshold)


def test_config_without_variant_loads_as_topk(tmp_path):
    model = KSparseAutoencoder(8, 32, k=4)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("variant"), config.pop("prefixes")  # a file written before variants existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = KSparseAutoencoder.from_pretrained(tmp_path)
    assert loaded.variant == "topk" and loaded.code_width == 4
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x)[0], model(x)[0])


def test_unknown_variant_and_bad_prefixes_fail_clearly():
    with pytest.raises(ValueError, match="variant must be one of"):
        KSparseAutoencoder(8, 32, variant="jumprelu2")
    with pytest.raises(ValueError, match="matryoshka prefixes must increase"):
        KSparseAutoencoder(8, 32, variant="matryoshka", prefixes=[8, 4, 32])
    with pytest.raises(ValueError, match="belong to the 'matryoshka'"):
        KSparseAutoencoder(8, 32, variant="topk", prefixes=[8, 32])
    with pytest.raises(ValueError, match="must be one of"):
        SAETrainConfig(variant="gated")
    assert default_prefixes(64) == [4, 8, 16, 32, 64]


def test_batch_topk_keeps_k_per_sample_on_average_and_its_gradient_equals_autograd():
    torch.manual_seed(0)
    n, d, m, k = 12, 6, 20, 3
    x, w, b = torch.randn(n, d, requires_grad=True), torch.randn(m, d, requires_grad=True), torch.randn(m, requires_grad=True)
    vals, idx, _, _ = topk_encode(x, w, b, k, relu=True, batch_topk=True)
    pre = torch.relu(x @ w.T + b)
    assert int((vals > 0).sum()) == min(k * n, int((pre > 0).sum()))  # the batch's k·N largest, ragged per row
    chosen = torch.zeros(n, m).scatter_(1, idx, (vals > 0).float()).bool()
    assert pre[chosen].min() >= pre[~chosen].max()
    per_row = chosen.sum(1)
    assert per_row.max() > per_row.min()  # rows really get different counts
    weight = torch.randn_like(vals)
    (vals * weight).sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    dense = torch.zeros(n, m).scatter_(1, idx, weight * (vals > 0))
    ((x @ w.T + b) * dense).sum().backward()
    for got, want in zip(grads, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batch_topk_inference_uses_the_learned_threshold(tmp_path):
    result, x, _ = _train("batchtopk", tmp_path)
    model = result.model
    theta = float(model.threshold)
    vals, idx = model.encode(x[:200])
    pre = model.preactivations(x[:200] * model.scale)
    assert vals.shape[-1] == model.code_width == 16
    active = torch.zeros_like(pre).scatter_(1, idx, vals)
    # every latent above θ is active (none of these rows has more than the slots), none at or below it
    assert torch.equal(active > 0, pre > theta)
    assert 1 < (vals > 0).sum(1).float().mean() < 3 * model.k


def test_matryoshka_loss_sums_the_prefix_reconstructions():
    torch.manual_seed(0)
    model = KSparseAutoencoder(8, 32, k=4, variant="matryoshka", prefixes=[4, 16, 32])
    x = torch.randn(10, 8)
    codes = encode_for_training(model, x - model.b_pre, k=4, relu=True, aux_ids=None, k_aux=0, compute_dtype=None,
                                aux_mask=None)
    assert len(codes.terms) == 3
    for (_, v, i), end in zip(codes.terms[1:], (4, 16)):
        assert torch.equal(v != 0, (codes.vals != 0) & (codes.idx < end))
        assert torch.equal(i, codes.idx)


def test_multitopk_trains_on_k_and_4k_and_infers_with_k():
    torch.manual_seed(0)
    model = KSparseAutoencoder(8, 64, k=3, variant="multitopk")
    x = torch.randn(10, 8)
    codes = encode_for_training(model, x - model.b_pre, k=3, relu=True, aux_ids=None, k_aux=0, compute_dtype=None,
                                aux_mask=None)
    (w1, v1, i1), (w4, v4, i4) = codes.terms
    assert (w1, w4) == (1.0, 1 / 8) and v1.shape[-1] == 3 and v4.shape[-1] == 12
    vals, idx = model.encode(x)
    assert torch.equal(torch.sort(vals, dim=1).values, torch.sort(v1.detach(), dim=1).values)
    assert torch.equal(torch.sort(idx, dim=1).values, torch.sort(i1, dim=1).values)


def test_paper_recipe_keeps_the_original_rate_and_the_default_scales_it():
    paper = SAETrainConfig(recipe="paper")
    assert (paper.lr, paper.warmup_steps, paper.variant) == (4e-4, 500, "topk")
    default = SAETrainConfig()
    assert default.lr is None and default.warmup_steps is None
    assert get_recipe("paper").sae.lr == 4e-4
    # wider dictionaries get smaller rates, shorter runs larger ones, within bounds
    assert auto_lr(2**16, 10_000) < auto_lr(2**14, 10_000) < auto_lr(2**12, 10_000)
    assert auto_lr(2**14, 100) > auto_lr(2**14, 2000) > auto_lr(2**14, 100_000)
    assert auto_lr(2**14, 1) == auto_lr(2**14, 10)  # capped
    assert auto_warmup(122) == 12 and auto_warmup(100_000) == 500


def test_default_run_records_the_rate_it_used(tmp_path):
    x, _ = make_synthetic(SPEC, 2048)
    cfg = SAETrainConfig(k=4, n_latents=64, batch_size=256, steps=20, eval_fraction=0.05, checkpoint_every=0)
    result = train_sae(x, cfg, out_dir=tmp_path / "run", progress=False)
    assert result.eval["lr"] == pytest.approx(auto_lr(64, 20)) and result.eval["warmup_steps"] == 2
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["lr"] is None  # the rule, so the same command finds the same run again
    again = train_sae(x, cfg, out_dir=tmp_path / "run", progress=False)
    assert again.eval == result.eval


def test_synthetic_atoms_and_mcc():
    x, atoms = make_synthetic(SPEC, 500)
    again, _ = make_synthetic(SPEC, 500)
    assert torch.equal(x, again) and atoms.shape == (32, 16)
    assert torch.allclose(atoms.norm(dim=1), torch.ones(32))
    assert atom_mcc(atoms, atoms) == pytest.approx(1.0)
    assert atom_mcc(torch.cat([-atoms[torch.randperm(32)], torch.randn(8, 16)]), atoms) == pytest.approx(1.0)
    assert atom_mcc(torch.randn(64, 16), atoms) < 0.8


def test_cli_variant_option_is_recorded(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from safetensors.torch import save_file

    x, _ = make_synthetic(SPEC, 600)
    save_file({"x": x}, str(tmp_path / "feats.safetensors"))
    spec = importlib.util.spec_from_file_location("train_ksae", Path(__file__).parents[1] / "training/train_ksae.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "sae"
    argv = ["--features", str(tmp_path / "feats.safetensors"), "--variant", "matryoshka", "--k", "3", "--expansion", "4",
            "--batch-size", "64", "--steps", "5", "--eval-fraction", "0.05", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert KSparseAutoencoder.from_pretrained(out).variant == "matryoshka"
    printed = json.loads(capsys.readouterr().out)
    assert printed["variant"] == "matryoshka" and printed["lr"] == pytest.approx(auto_lr(64, 5))
    assert json.loads((out / "train_config.json").read_text())["variant"] == "matryoshka"
    with pytest.raises(SystemExit):  # argparse refuses an unknown variant, naming the choices
        cli.main(argv[:3] + ["gated"] + argv[4:])
    assert "invalid choice: 'gated'" in capsys.readouterr().err


def test_scoreboard_scores_and_table():
    from revelio_hub.sae.scoreboard import (factor_indicators, matched_correlation, scoreboard_markdown,
                                            sparse_probe_accuracy)

    g = torch.Generator().manual_seed(0)
    y = {"shape": torch.randint(0, 3, (300,), generator=g), "color": torch.randint(0, 2, (300,), generator=g)}
    ind, names = factor_indicators(y, {"shape": 3, "color": 2})
    assert names == ["shape=0", "shape=1", "shape=2", "color=0", "color=1"] and ind.shape == (300, 5)
    noise = torch.rand(300, 20, generator=g)
    perfect = torch.cat([noise, ind[:, [3, 0, 4, 2, 1]]], 1)  # one dedicated neuron per value, anywhere
    assert matched_correlation(perfect, ind) == pytest.approx(1.0)
    assert matched_correlation(noise, ind) < 0.3
    fit = torch.arange(300) % 2 == 0
    assert sparse_probe_accuracy(perfect[fit], y["shape"][fit], perfect[~fit], y["shape"][~fit], 3, 1) == 1.0
    assert sparse_probe_accuracy(noise[fit], y["shape"][fit], noise[~fit], y["shape"][~fit], 3, 1) < 0.6
    table = scoreboard_markdown({"toy": [{"entry": "bottleneck/t25", "variant": "batchtopk", "fvu": 0.1, "l0": 8.0,
                                          "dead_fraction": 0.0, "matched_correlation": 0.8, "probe_1": 0.9,
                                          "probe_5": 0.95, "probe_dense": 0.97, "diffc_loss_recovered": None}],
                                 "synthetic": [{"variant": "topk", "d": 128, "n_atoms": 512, "mcc": 0.97, "fvu": 0.2,
                                                "l0": 8.0, "dead_fraction": 0.1}]})
    assert "| bottleneck/t25 | batchtopk | 0.100 | 8.000 | 0.000 | 0.800 | 0.900 | 0.950 | 0.970 | — |" in table
    assert "| d 128, 512 atoms | topk | 0.970 |" in table


def test_toy_build_records_its_sae_variant_and_rate_and_old_files_read_as_before():
    from revelio_hub.toy.build_recipe import TOY_SAE_LR, TOY_SAE_VARIANT, ToyBuildConfig

    full = ToyBuildConfig.full().to_dict()
    assert (full["sae_variant"], full["sae_lr"]) == (TOY_SAE_VARIANT, TOY_SAE_LR)
    assert ToyBuildConfig.from_dict(full) == ToyBuildConfig.full()
    old = {k: v for k, v in full.items() if k not in ("sae_variant", "sae_token_sampling")} | {"sae_lr": 2e-3}
    # ^ a toy_build.json from before
    assert ToyBuildConfig.from_dict(old).sae_variant == "topk"
    assert ToyBuildConfig.from_dict(old).sae_token_sampling == "uniform"  # drawn uniformly before the choice existed
    assert full["sae_token_sampling"] == "deviation"
    with pytest.raises(ValueError, match="sae_token_sampling must be one of"):
        ToyBuildConfig(sae_token_sampling="norm")


def test_merged_scoreboard_names_each_arm_and_its_card_section_is_replaced_not_duplicated():
    from revelio_hub.sae.scoreboard import CARD_HEADING, card_section, merge_reports, with_card_section

    def report(lr, fvu, steps=1000):
        rows = [{"entry": "bottleneck/t25", "variant": v, "fvu": fvu, "matched_correlation": 0.5}
                for v in ("release", "topk")]
        return {"settings": {"lr": lr, "steps": steps, "work": "/srv/builds/toy-work", "layers": ["bottleneck"],
                             "merge": ["/home/me/a.json"]}, "toy": rows, "synthetic": []}

    merged = merge_reports([report(2e-3, 0.2), report(0.0, 0.15, steps=6000), report(0.0, 0.1)])
    # the scoreboard is published with the release: the folders it was made in are cut to their names
    assert merged["settings"][0] == {"lr": 2e-3, "steps": 1000, "work": "toy-work", "layers": ["bottleneck"],
                                     "merge": ["a.json"]}
    arms = [r["variant"] for r in merged["toy"]]
    assert arms == ["this release", "topk · default lr rule · 1000 steps", "topk · default lr rule · 6000 steps",
                    "topk · lr 0.002 · 1000 steps"]
    assert [r["fvu"] for r in merged["toy"]][0] == 0.1  # the release row of the last report (the release scored now)
    card = "# Card\n\nintro\n\n## Later section\n\ntext\n"
    once = with_card_section(card, card_section(merged))
    twice = with_card_section(once, card_section(merge_reports([report(0.0, 0.3)])))
    assert twice.count(CARD_HEADING) == 1 and "## Later section" in twice and "0.300" in twice and "0.100" not in twice
    assert "no row there" not in once
    # an entry whose release SAE is pooled has variant rows but no release row (never scored on tokens): said so
    pooled = dict(merged, toy=merged["toy"] + [{"entry": "up_ft1/t25", "variant": "topk", "fvu": 0.2}])
    assert "at up_ft1/t25 this release's SAE is trained on pooled vectors instead, so it has no row there" in \
        card_section(pooled)


def test_nameable_listings_names_single_value_neurons_and_not_mixed_ones():
    from revelio_hub.sae.scoreboard import nameable_listings

    g = torch.Generator().manual_seed(0)
    n = 400
    y = torch.randint(0, 3, (n,), generator=g)
    mixed = torch.rand(n, generator=g) < 0.4  # fires on 40 % of images whatever their value
    acts = torch.stack([(y == 1) * (1 + torch.rand(n, generator=g)), mixed * (1 + torch.rand(n, generator=g)),
                        (y == 0) * (1 + torch.rand(n, generator=g))], 1).float()
    fit = torch.arange(n) % 2 == 0
    coverage, precision = nameable_listings(acts, {"f": y}, fit, strong=1.0)
    # a held-out image of value 0 or 1 lists its single-value neuron, and the mixed one where it fires
    listed_single = int((~fit & (y < 2)).sum())
    listed_mixed = int((mixed & ~fit).sum())
    assert coverage == pytest.approx(listed_single / (listed_single + listed_mixed))
    assert precision == 1.0
    # a single-value neuron whose value flips on the held-out images is named, and its name is then false
    flipped = acts.clone()
    flipped[~fit, 0], flipped[~fit, 2] = acts[~fit, 2], acts[~fit, 0]
    assert nameable_listings(flipped, {"f": y}, fit, strong=1.0)[1] == 0.0


def test_scoreboard_rows_say_how_their_training_positions_were_drawn():
    """The release's token SAEs may draw positions by deviation while older variant rows drew 32 uniformly: a row
    must say which, or the card compares unlike trainings as like."""
    from revelio_hub.sae.scoreboard import merge_reports

    def report(**settings):
        return {"settings": {"lr": 0.0, "steps": 6000, **settings},
                "toy": [{"entry": "bottleneck/t25", "variant": "topk", "fvu": 0.1}], "synthetic": []}

    merged = merge_reports([report(tokens_per_image=32), report(tokens_per_image=16, token_sampling="deviation")])
    assert [r["variant"] for r in merged["toy"]] == [
        "topk · default lr rule · 6000 steps · 16 deviation positions",
        "topk · default lr rule · 6000 steps · 32 uniform positions"]
