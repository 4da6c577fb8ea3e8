"""Learned augmentation in a VAE's latent space: unconstrained image edits that make teacher and
student disagree.

HARD (Nix, Burg & Sinz 2023, arXiv 2305.14890) applies its learned augmentation framework to
"simple spatial transformations" (``learned_augment``) and to "unconstrained image manipulations
with a pretrained variational autoencoder". This is the second, reproduced from the abstract (the
paper body and code were not reachable here; the authors' repository holds only a README): a
frozen VAE (``kdkit.models.vae.ConvVAE``) encodes the image, a small network moves its latent
mean, and the VAE decodes the moved latent:

    mu = E(x)                                                   (the posterior mean, [c, H/4, W/4])
    z_hat = mu + strength * tanh(e_phi(mu, z))                 (|z_hat - mu| <= strength elementwise)
    x_hat = D(z_hat)

``e_phi`` is two 3x3 convolutions over the latent with the noise ``z ~ N(0, I)`` broadcast over
the grid; its last layer starts at zero, so at the start ``x_hat = D(E(x))``, the VAE's
reconstruction (not ``x``: the rows the policy replaces are always decoded images). ``e_phi``
takes one Adam step per training step on ``learned_augment``'s objective,

    L_aug = - mean_i KL(T(x_hat_i)/tau || S(x_hat_i)/tau) + lam * mean_i KL(T(x_i) || T(x_hat_i)),

and everything else (which rows are replaced, the teacher outputs handed on, DDP, checkpoints) is
``LearnedAugment``'s. The VAE stays frozen; its gradient reaches ``phi`` through it.

The VAE comes from ``vae`` (a state_dict file). When that file does not exist, it is trained
there before any stage trains (``pretrain_epochs`` passes of the training loader, Adam, the ELBO
of ``kdkit.models.vae``) and saved, with its loss per epoch in ``<vae>.json`` (reported in
``results.json``) and eight training images over their reconstructions in ``<vae>.png``, so later
runs and the other DDP ranks load it. Only a
process that is rank 0 trains it: any other rank that finds no file stops with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError, launched_as_rank_zero, say
from kdkit.models.vae import ConvVAE, check_vae_images, load_vae, save_vae, train_vae
from kdkit.selection.learned_augment import LearnedAugment


class LatentAugmentor(nn.Module):
    """``x_hat = D(mu + strength * tanh(e_phi(mu, z)))`` around a frozen ``vae``.

    Args:
        vae: the pretrained VAE (frozen here: ``requires_grad_(False)``, eval mode).
        noise_dim: size of ``z``.
        strength: bound of ``|z_hat - mu|`` per latent entry.
        width: channels of ``e_phi``'s hidden convolution.
        generator: draws ``e_phi``'s first convolution (so every DDP rank starts alike).
    """

    def __init__(self, vae: ConvVAE, noise_dim: int = 8, strength: float = 1.0, width: int = 16,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.noise_dim, self.strength = noise_dim, strength
        c = vae.latent_channels
        self.edit1 = nn.Conv2d(c + noise_dim, width, 3, padding=1)
        self.edit2 = nn.Conv2d(width, c, 3, padding=1)
        nn.init.kaiming_uniform_(self.edit1.weight, a=5 ** 0.5, generator=generator)
        bound = 1 / self.edit1.weight[0].numel() ** 0.5
        nn.init.uniform_(self.edit1.bias, -bound, bound, generator=generator)
        nn.init.zeros_(self.edit2.weight)  # start at the VAE's reconstruction
        nn.init.zeros_(self.edit2.bias)

    def train(self, mode: bool = True) -> LatentAugmentor:
        super().train(mode)
        self.vae.eval()  # frozen whatever the policy's mode
        return self

    def latents(self, images: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, z_hat)`` for ``images`` and ``noise`` ``[B, noise_dim]``."""
        mu, _ = self.vae.encode(images)
        grid = noise[:, :, None, None].expand(-1, -1, *mu.shape[-2:])
        delta = self.edit2(F.relu(self.edit1(torch.cat([mu, grid], 1))))
        return mu, mu + self.strength * torch.tanh(delta)

    def forward(self, images: Tensor, noise: Tensor) -> Tensor:
        return self.vae.decode(self.latents(images, noise)[1])


class VAEAugment(LearnedAugment):
    """HARD-style learned augmentation through a frozen VAE's latent (see the module docstring).

    Args:
        vae: path of the VAE's state_dict; trained and written there first when missing.
        pretrain_epochs: passes over the training loader when ``vae`` must be trained (0: never
            train, a missing file is an error).
        pretrain_lr: Adam learning rate of that pre-training.
        latent_channels: channels of the VAE's latent grid (H/4 x W/4).
        vae_width: channels of the VAE's first convolution.
        beta: weight of the KL term in the VAE's ELBO.
        recon_sigma: the VAE likelihood's fixed standard deviation (pixels in [0, 1]).
        fraction, lr, temperature, consistency, noise_dim, teacher, seed: as ``LearnedAugment``.
        strength: bound of ``|z_hat - mu|`` per latent entry (> 0).
        width: channels of ``e_phi``'s hidden convolution.
    """

    name = "vae_augment"

    def __init__(self, vae: str, pretrain_epochs: int = 10, pretrain_lr: float = 1e-3, latent_channels: int = 8,
                 vae_width: int = 32, beta: float = 1.0, recon_sigma: float = 0.1, fraction: float = 0.5,
                 strength: float = 1.0, lr: float = 1e-3, temperature: float = 1.0, consistency: float = 1.0,
                 width: int = 16, noise_dim: int = 8, teacher: str | None = None, seed: int = 0):
        super().__init__(fraction=fraction, strength=strength, lr=lr, temperature=temperature,
                         consistency=consistency, width=width, noise_dim=noise_dim, teacher=teacher, seed=seed)
        checks = {"vae": (vae, bool(vae), "must name a file"),
                  "pretrain_epochs": (pretrain_epochs, pretrain_epochs >= 0, "must be >= 0"),
                  "pretrain_lr": (pretrain_lr, pretrain_lr > 0, "must be > 0"),
                  "latent_channels": (latent_channels, latent_channels >= 1, "must be >= 1"),
                  "vae_width": (vae_width, vae_width >= 1, "must be >= 1"),
                  "beta": (beta, beta >= 0, "must be >= 0"),
                  "recon_sigma": (recon_sigma, recon_sigma > 0, "must be > 0")}
        for knob, (value, ok, rule) in checks.items():
            if not ok:
                raise KdkitError(f"selection.{self.name}.{knob}={value!r} {rule}")
        self.vae_path = Path(vae)
        self.pretrain_epochs, self.pretrain_lr = pretrain_epochs, pretrain_lr
        self.latent_channels, self.vae_width = latent_channels, vae_width
        self.beta, self.recon_sigma = beta, recon_sigma
        self.vae: ConvVAE | None = None
        self.pretrain_history: list[float] = []

    # ---- the VAE: loaded, or trained before any stage trains ----------------------------------
    def check_data(self, datamodule) -> None:
        images = datamodule.example_batch().get("image")
        if not isinstance(images, Tensor):
            raise KdkitError(f"selection.{self.name} edits images: it needs image batches with an 'image' tensor")
        check_vae_images(images, f"selection.{self.name}")
        if self.vae is None:
            self.vae = self._load_or_train(datamodule, images.shape[1])

    def _load_or_train(self, datamodule, channels: int) -> ConvVAE:
        where = f"selection.{self.name}.vae={self.vae_path}"
        train = not self.vae_path.is_file()
        if train and self.pretrain_epochs == 0:
            raise KdkitError(f"{where}: no such file, and pretrain_epochs=0 forbids training one here")
        if train and not launched_as_rank_zero():
            raise KdkitError(f"{where}: no such file on this rank; rank 0 trains it before the other ranks "
                             "start, or train it once in one process (same command, one device)")
        device = torch.device("cuda" if train and torch.cuda.is_available() else "cpu")
        # Its own random stream: a run that trains the VAE and one that loads it draw the same
        # numbers everywhere else (the student's initial weights, the data order).
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # the VAE's initial weights
            vae = ConvVAE(channels, self.latent_channels, self.vae_width).to(device)
            if not train:
                return load_vae(vae, self.vae_path)
            say(f"selection.{self.name}: no VAE at {self.vae_path}; training one ({self.pretrain_epochs} "
                "passes of the training loader) before any stage")
            self.pretrain_history = train_vae(vae, datamodule.train_dataloader(), self.pretrain_epochs,
                                              self.pretrain_lr, self.beta, self.recon_sigma, self.seed,
                                              desc=f"{self.name}: VAE pre-training")
        save_vae(vae, self.vae_path)
        say(f"selection.{self.name}: VAE saved to {self.vae_path} (loss per pass "
            f"{self.pretrain_history[0]:.4g} -> {self.pretrain_history[-1]:.4g})")
        _sidecar(self.vae_path).write_text(json.dumps({"epochs": self.pretrain_epochs, "loss": self.pretrain_history}))
        vae = vae.cpu().eval()
        save_reconstructions(vae, datamodule.example_batch(8)["image"], self.vae_path.with_name(self.vae_path.name + ".png"))
        return vae

    def make_augmentor(self, images: Tensor, generator: torch.Generator) -> nn.Module:
        if self.vae is None:
            raise KdkitError(f"selection.{self.name}: no VAE yet (check_data loads or trains it before training)")
        return LatentAugmentor(self.vae, self.noise_dim, self.strength, self.width, generator)

    def summary(self) -> dict:
        facts = {**super().summary(), "vae": str(self.vae_path)}
        notes = _sidecar(self.vae_path)
        if notes.is_file():  # written by whichever process trained the VAE
            history = json.loads(notes.read_text())
            facts.update(vae_pretrain_epochs=history["epochs"], vae_pretrain_final_loss=history["loss"][-1])
        return facts


def save_reconstructions(vae: ConvVAE, images: Tensor, path: Path) -> Path:
    """A PNG of ``images`` (top row) over the VAE's reconstructions ``D(E(x))`` (bottom row): what
    every edit starts from."""
    from torchvision.utils import save_image

    with torch.no_grad():
        reconstructions = vae.decode(vae.encode(images.float())[0])
    save_image(torch.cat([images.float(), reconstructions]), path, nrow=len(images), padding=1)
    return path


def _sidecar(path: Path) -> Path:
    """``<vae>.json``: how the VAE at ``path`` was trained (epochs, loss per epoch)."""
    return path.with_name(path.name + ".json")
