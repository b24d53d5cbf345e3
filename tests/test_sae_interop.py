"""TopK SAEs from and to sparsify's and SAELens's layouts (outputs equal to 1e-5).

The hand-built layouts follow each project's save code (file names, tensor names
and shapes, encode/decode formulas); the package checks run when
``eai-sparsify`` / ``sae-lens`` are installed (optional test dependencies).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from revelio_hub.sae.interop import load_saelens, load_sparsify, save_saelens
from revelio_hub.sae.model import KSparseAutoencoder

D, N, K = 12, 48, 5


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _dense(vals, idx, n=N):
    return torch.zeros(vals.shape[0], n).scatter_(1, idx, vals)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g), 0.3 * torch.randn(N, generator=g), torch.randn(N, D, generator=g),
            torch.randn(D, generator=g))


def _sparsify_reference(x, enc_w, enc_b, w_dec, b_dec, k=K):
    """sparsify's SparseCoder: TopK of ReLU(encoder(x − b_dec)), decoded as z W_dec + b_dec."""
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    vals, idx = pre.topk(k, dim=-1)
    return _dense(vals, idx), _dense(vals, idx) @ w_dec + b_dec


def test_sparsify_layout_by_hand(tmp_path):
    enc_w, enc_b, w_dec, b_dec = _tensors()
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                                   "num_latents": N, "k": K, "multi_topk": False,
                                                   "skip_connection": False, "transcode": False, "d_in": D}))
    model = load_sparsify(tmp_path)
    x = torch.randn(64, D)
    codes, recon = _sparsify_reference(x, enc_w, enc_b, w_dec, b_dec)
    _close(model.encode_dense(x), codes)
    _close(model(x)[0], recon)


def test_sparsify_refuses_what_has_no_equivalent(tmp_path):
    enc_w, enc_b, w_dec, b_dec = _tensors()
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"k": K, "transcode": True, "d_in": D}))
    with pytest.raises(ValueError, match="transcoder"):
        load_sparsify(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"k": K, "activation": "groupmax", "d_in": D}))
    with pytest.raises(ValueError, match="groupmax"):
        load_sparsify(tmp_path)
    with pytest.raises(ValueError, match="sae.safetensors missing"):
        load_sparsify(tmp_path / "nowhere")


def test_sparsify_package_round_trip(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(k=K, num_latents=N))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.3)
        coder.b_dec.normal_()
    coder.save_to_disk(tmp_path)
    model = load_sparsify(tmp_path)
    x = torch.randn(64, D)
    out = coder(x)
    with torch.no_grad():
        _close(model(x)[0], out.sae_out)
        _close(model.encode_dense(x), _dense(out.latent_acts, out.latent_indices))


def _saelens_reference(x, cfg, t):
    """SAELens TopKSAE: (x − b_dec·apply) W_enc + b_enc, × decoder norms if rescaling; TopK then ReLU; z W_dec + b_dec."""
    pre = (x - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    if cfg["rescale_acts_by_decoder_norm"]:
        pre = pre * norms
    vals, idx = pre.topk(cfg["k"], dim=-1)
    z = _dense(vals.relu(), idx)
    dec_in = z / norms if cfg["rescale_acts_by_decoder_norm"] else z
    return z, dec_in @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("apply_b_dec,rescale", [(True, False), (False, False), (True, True), (False, True)])
def test_saelens_layout_by_hand(tmp_path, apply_b_dec, rescale):
    enc_w, enc_b, w_dec, b_dec = _tensors(1)
    t = {"W_enc": enc_w.T.contiguous(), "b_enc": enc_b, "W_dec": 1.7 * w_dec, "b_dec": b_dec}
    cfg = {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": rescale, "metadata": {}}
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    model = load_saelens(tmp_path)
    x = torch.randn(64, D)
    z, recon = _saelens_reference(x, cfg, t)
    _close(model.encode_dense(x), z)  # the norms move into the encoder: the codes themselves are SAELens's
    _close(model(x)[0], recon)


def test_saelens_refuses_other_architectures_and_normalisations(tmp_path):
    enc_w, enc_b, w_dec, b_dec = _tensors()
    save_file({"W_enc": enc_w.T.contiguous(), "b_enc": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "k": K}))
    with pytest.raises(ValueError, match="'jumprelu'"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": K,
                                                   "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(ValueError, match="normalises"):
        load_saelens(tmp_path)


def test_export_to_saelens_and_back_with_input_scale(tmp_path):
    torch.manual_seed(0)
    model = KSparseAutoencoder(D, N, k=K, input_norm={"scale": 0.37})
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
        model.b_pre.normal_()
    save_saelens(model, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "sae_weights.safetensors"))
    x = torch.randn(64, D) * 3
    z, recon = _saelens_reference(x, cfg, t)
    _close(model.encode_dense(x), z)
    _close(model(x)[0], recon)
    back = load_saelens(tmp_path)
    _close(back(x)[0], model(x)[0])
    with pytest.raises(ValueError, match="no SAELens TopK equivalent"):
        save_saelens(KSparseAutoencoder(D, N, k=K, variant="batchtopk"), tmp_path / "b")


def test_saelens_package_loads_our_export(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    model = KSparseAutoencoder(D, N, k=K, input_norm={"scale": 0.5})
    save_saelens(model, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(64, D)
    with torch.no_grad():
        _close(theirs(x), model(x)[0])
        _close(theirs.encode(x), model.encode_dense(x))
