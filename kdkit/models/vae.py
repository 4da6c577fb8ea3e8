"""A small convolutional VAE with a spatial latent, and its pre-training loop.

The image model that HARD's VAE augmentation edits (``kdkit.selection.vae_augment``): HARD (Nix,
Burg & Sinz 2023) manipulates images "unconstrained" through a pretrained variational autoencoder.
This VAE (Kingma & Welling 2014, "Auto-Encoding Variational Bayes") maps images in [0, 1] to a
Gaussian posterior over a latent grid at a quarter of the resolution,

    q(z | x) = N(mu(x), diag(exp(logvar(x)))),   z in R^{latent_channels x H/4 x W/4}

and decodes ``z`` with a sigmoid output. It is trained on the negative ELBO per image,

    L = sum_pixels (x - x_rec)^2 / (2 sigma^2) + beta * KL(q(z | x) || N(0, I)),
    KL = 1/2 sum_latent (mu^2 + exp(logvar) - 1 - logvar),

a Gaussian likelihood with fixed ``sigma`` (``recon_sigma``). A small ``sigma`` weighs the
reconstruction; the latent is what the augmentor moves, so it must decode to the image first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError


class ConvVAE(nn.Module):
    """Two stride-2 convolutions down to ``latent_channels`` at H/4 x W/4 (mean and log-variance),
    two transposed convolutions back up, sigmoid output.

    Args:
        in_channels: channels of the images.
        latent_channels: channels of the latent grid.
        width: channels of the first convolution (the second has twice as many).
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 8, width: int = 32):
        super().__init__()
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(width, in_channels, 4, stride=2, padding=1))

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)``, each ``[B, latent_channels, H/4, W/4]``."""
        mu, logvar = self.encoder(images).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z))

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(reconstruction, mu, logvar)`` with ``z = mu + exp(logvar / 2) * eps`` sampled."""
        mu, logvar = self.encode(images)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return self.decode(mu + torch.exp(0.5 * logvar) * eps), mu, logvar


def vae_loss(images: Tensor, reconstruction: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0,
             recon_sigma: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, reconstruction term, KL term)``, each the mean over the batch of per-image sums."""
    rec = (images - reconstruction).pow(2).flatten(1).sum(1) / (2 * recon_sigma ** 2)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    return (rec + beta * kl).mean(), rec.mean(), kl.mean()


def check_vae_images(images: Tensor, where: str) -> None:
    """The VAE reads and writes images in [0, 1] with sides divisible by 4."""
    if images.dim() != 4 or images.shape[-1] % 4 or images.shape[-2] % 4:
        raise KdkitError(f"{where}: the VAE needs images [B, C, H, W] with H and W divisible by 4, "
                         f"got {tuple(images.shape)}")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise KdkitError(f"{where}: the VAE reads images in [0, 1] (as kdkit's image datamodules serve "
                         f"them, before the task normalises), got values in [{lo:.3g}, {hi:.3g}]")


def train_vae(vae: ConvVAE, batches, epochs: int, lr: float = 1e-3, beta: float = 1.0,
              recon_sigma: float = 0.1, seed: int = 0, desc: str = "VAE pre-training") -> list[float]:
    """Adam on ``vae_loss`` over ``epochs`` passes of ``batches`` (an iterable of image tensors, or
    of dicts with an ``'image'``, re-iterated each epoch, e.g. a DataLoader), each moved to the
    VAE's device. Returns each epoch's mean loss. The progress bar shows on a terminal only (a
    log file of a batch job gets no carriage-return churn)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch in tqdm(batches, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch", leave=False,
                          disable=None):
            images = (batch["image"] if isinstance(batch, dict) else batch).to(device).float()
            if count == 0 and epoch == 0:
                check_vae_images(images, desc)
            eps_g = g if images.device.type == "cpu" else None
            reconstruction, mu, logvar = vae(images, eps_g)
            loss, _, _ = vae_loss(images, reconstruction, mu, logvar, beta, recon_sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(images), count + len(images)
        if count == 0:
            raise KdkitError(f"{desc}: the training loader gave no batches")
        history.append(total / count)
    return history


def save_vae(vae: ConvVAE, path: str | os.PathLike) -> Path:
    """The state_dict to ``path``, written to a temporary file first, so that a process reading
    ``path`` (another DDP rank) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({k: v.detach().cpu() for k, v in vae.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return path


def load_vae(vae: ConvVAE, path: str | os.PathLike) -> ConvVAE:
    """``vae`` filled from ``path`` (``weights_only``: no code runs), with the file named in errors."""
    from kdkit.checkpoints import load_weights

    return load_weights(vae, path, what="VAE checkpoint")


def reconstruction_error(vae: ConvVAE, images: Tensor) -> float:
    """Mean squared error of ``decode(mu)`` against ``images``."""
    with torch.no_grad():
        return F.mse_loss(vae.decode(vae.encode(images)[0]), images).item()
