"""ConvVAE: latent at a quarter of the resolution, the ELBO against torch.distributions, training
that really lowers the reconstruction error, and files written whole and read without code."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from kdkit.errors import KdkitError
from kdkit.models.vae import (
    ConvVAE,
    check_vae_images,
    load_vae,
    reconstruction_error,
    save_vae,
    train_vae,
    vae_loss,
)


def _blobs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth images (a bright Gaussian blob on a coloured background): structure a VAE can learn."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * size
    blob = torch.exp(-((ys - centre[:, 0, None, None]) ** 2 + (xs - centre[:, 1, None, None]) ** 2) / 8.0)
    background = torch.rand(n, 3, 1, 1, generator=g) * 0.5
    return (background + 0.5 * blob[:, None]).clamp(0, 1)


def test_the_latent_is_a_quarter_of_the_image_and_decodes_into_the_unit_interval():
    vae = ConvVAE(in_channels=3, latent_channels=5, width=8)
    images = torch.rand(2, 3, 32, 24)
    mu, logvar = vae.encode(images)
    assert mu.shape == logvar.shape == (2, 5, 8, 6)
    reconstruction, mu2, _ = vae(images, torch.Generator().manual_seed(0))
    assert reconstruction.shape == images.shape
    assert torch.equal(mu, mu2)
    assert (reconstruction > 0).all() and (reconstruction < 1).all()


def test_sampling_follows_the_generator():
    vae = ConvVAE(in_channels=1, latent_channels=2, width=4)
    images = torch.rand(3, 1, 8, 8)
    a, _, _ = vae(images, torch.Generator().manual_seed(5))
    b, _, _ = vae(images, torch.Generator().manual_seed(5))
    c, _, _ = vae(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_loss_is_the_negative_elbo_of_a_gaussian_likelihood_and_prior():
    g = torch.Generator().manual_seed(0)
    images, reconstruction = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    mu, logvar = torch.randn(4, 2, 2, 2, generator=g), torch.randn(4, 2, 2, 2, generator=g)
    sigma, beta = 0.2, 0.7
    loss, rec, kl = vae_loss(images, reconstruction, mu, logvar, beta=beta, recon_sigma=sigma)
    # -log N(x; x_rec, sigma) minus its constant part, summed per image
    nll = -Normal(reconstruction, sigma).log_prob(images) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    expected_rec = nll.flatten(1).sum(1)
    expected_kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(rec, expected_rec.mean(), rtol=1e-5)
    assert torch.allclose(kl, expected_kl.mean(), rtol=1e-5)
    assert torch.allclose(loss, (expected_rec + beta * expected_kl).mean(), rtol=1e-5)


def test_training_lowers_the_reconstruction_error_below_a_flat_colour():
    torch.manual_seed(0)
    images = _blobs(64)
    batches = [images[i:i + 16] for i in range(0, 64, 16)]
    flat_colour = (images - images.mean((2, 3), keepdim=True)).pow(2).mean().item()
    vae = ConvVAE(in_channels=3, latent_channels=4, width=16)
    before = reconstruction_error(vae, images)
    history = train_vae(vae, batches, epochs=80, lr=3e-3, recon_sigma=0.05, seed=0)
    after = reconstruction_error(vae, images)
    assert len(history) == 80 and history[-1] < 0.2 * history[0], history
    assert after < before / 10, (before, after)
    assert after < 0.5 * flat_colour, (after, flat_colour)  # the blobs are reconstructed, not only the colour


def test_training_takes_dict_batches_and_refuses_images_it_cannot_read():
    vae = ConvVAE(in_channels=1, latent_channels=2, width=4)
    assert len(train_vae(vae, [{"image": torch.rand(4, 1, 8, 8)}], epochs=2)) == 2
    with pytest.raises(KdkitError, match=r"in \[0, 1\].*\[-1, 1\]"):
        train_vae(vae, [torch.linspace(-1, 1, 256).view(4, 1, 8, 8)], epochs=1)
    with pytest.raises(KdkitError, match="no batches"):
        train_vae(vae, [], epochs=1)


def test_image_checks_name_the_shape_or_the_range():
    check_vae_images(torch.rand(2, 3, 8, 12), "here")
    with pytest.raises(KdkitError, match=r"divisible by 4, got \(2, 3, 8, 10\)"):
        check_vae_images(torch.rand(2, 3, 8, 10), "here")
    with pytest.raises(KdkitError, match="here: the VAE reads images in"):
        check_vae_images(torch.rand(2, 3, 8, 8) + 0.5, "here")


def test_a_saved_vae_loads_into_an_equal_model_and_leaves_no_temporary_file(tmp_path):
    torch.manual_seed(0)
    vae = ConvVAE(in_channels=3, latent_channels=4, width=8)
    path = save_vae(vae, tmp_path / "sub" / "vae.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["vae.pt"]
    torch.manual_seed(1)
    loaded = load_vae(ConvVAE(in_channels=3, latent_channels=4, width=8), path)
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(images)[0], vae.encode(images)[0])


def test_a_file_that_needs_code_to_load_or_does_not_fit_is_refused_by_name(tmp_path):
    pickled = tmp_path / "module.pt"
    torch.save(ConvVAE(1, 2, 4), pickled)  # a whole pickled module: loading it would run code
    with pytest.raises(KdkitError, match="VAE checkpoint .*module.pt"):
        load_vae(ConvVAE(1, 2, 4), pickled)
    path = save_vae(ConvVAE(1, 2, 4), tmp_path / "small.pt")
    with pytest.raises(KdkitError, match="VAE checkpoint .*small.pt does not fit ConvVAE"):
        load_vae(ConvVAE(1, 3, 4), path)
