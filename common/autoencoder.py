"""A small tabular autoencoder for mixed-type customer records (torch, no Flower).

Numeric columns enter standardised with the *global* scaling of the moments round; a boolean
column enters as 0/1; a categorical feature (one-hot columns of the same ``group``, declared
vocabulary) enters through a learned embedding of its value index. The encoder maps a record
to a small embedding; the decoder reconstructs every column with the loss of its type (squared
error for numbers, binary cross-entropy for flags, cross-entropy for categories), each original
feature weighing the same.

Everything a federation exchanges about the model is one flat float64 vector of public length
(:meth:`TabularAutoencoder.get_flat` / :meth:`set_flat`), so it travels through the same exact
SecAgg+ sums as the k-means statistics. The layout of the vector depends only on the public
feature list and :class:`AESettings`.

Randomness: initialisation from ``AESettings.seed``, mini-batch order from an explicit
``numpy.random.Generator`` -- never global random state; training on CPU with a seed is
deterministic.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from common.errors import ConfigError, DataError
from common.features import FeatureSpec

ARCHITECTURE_ID = "fedseg-tabular-ae/2"
"""Version of the network layout, of the flat parameter order and of what the bottleneck means
(version 2 adds the Gumbel-softmax bottleneck; version 1 files are refused)."""

DEVICES = ("auto", "cpu", "cuda")
BOTTLENECKS = ("tanh", "gumbel_softmax")
LOCAL_OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("average", "adam")
DRIFT_CORRECTIONS = ("none", "scaffold")
SPLIT_SOURCES = ("loss_sum", "mean_loss")
SERVER_ADAM = (0.9, 0.99, 1e-3)
"""Server Adam's ``beta1``, ``beta2`` and ``eps`` (no bias correction): the step is
``server_lr * m / (sqrt(v) + eps)`` on the round's pseudo-gradient ``FedAvg(w_i) - w``."""


@dataclass(frozen=True)
class TabularLayout:
    """Which columns of the (transformed) record matrix are numbers, flags and categories.

    Attributes
    ----------
    numeric : tuple of int
        Column indices of numeric features (standardised before entering the network).
    boolean : tuple of int
        Column indices of 0/1 flags.
    categorical : tuple of tuple of int
        One tuple of consecutive one-hot column indices per categorical feature.
    names : tuple of str
        One name per original feature (numeric, boolean, categorical order), for reports.
    """

    numeric: tuple[int, ...]
    boolean: tuple[int, ...]
    categorical: tuple[tuple[int, ...], ...]
    names: tuple[str, ...] = ()

    @classmethod
    def from_features(cls, features: tuple[FeatureSpec, ...]) -> TabularLayout:
        """Derive the layout from the public feature list (``FeatureSpec.kind`` / ``group``)."""
        numeric: list[int] = []
        boolean: list[int] = []
        groups: dict[str, list[int]] = {}
        for j, spec in enumerate(features):
            if spec.kind == "numeric":
                numeric.append(j)
            elif spec.kind == "boolean":
                boolean.append(j)
            else:
                columns = groups.setdefault(spec.group, [])
                if columns and columns[-1] != j - 1:
                    raise ConfigError(f"categorical feature {spec.group!r}: its one-hot columns "
                                      "are not consecutive in the feature list.")
                columns.append(j)
        for group, columns in groups.items():
            if len(columns) < 2:
                raise ConfigError(f"categorical feature {group!r} has {len(columns)} value; a "
                                  "category needs at least 2 declared values.")
        names = tuple([features[j].name for j in numeric] + [features[j].name for j in boolean]
                      + list(groups))
        return cls(numeric=tuple(numeric), boolean=tuple(boolean),
                   categorical=tuple(tuple(c) for c in groups.values()), names=names)

    @property
    def n_columns(self) -> int:
        """Columns of the record matrix."""
        return len(self.numeric) + len(self.boolean) + sum(len(c) for c in self.categorical)

    @property
    def n_original(self) -> int:
        """Original features (a categorical feature counts once)."""
        return len(self.numeric) + len(self.boolean) + len(self.categorical)


@dataclass(frozen=True)
class AESettings:
    """Architecture and local training of the autoencoder (``model`` group, ``ae_*`` keys).

    Attributes
    ----------
    hidden : tuple of int
        Widths of the encoder's hidden layers (the decoder mirrors them).
    embed_dim : int
        Size of the embedding the segments are found in; with the ``gumbel_softmax``
        bottleneck the number of codes, best ``k`` (each code becomes one segment).
    category_dim : int
        Size of each categorical feature's learned value embedding (at most its vocabulary).
    local_epochs : int
        Passes over a site's records per federated round when ``local_steps`` is 0.
    batch_size : int
    lr : float
        Local learning rate (of ``local_optimizer``).
    prox_mu : float
        FedProx proximal weight (0: off): ``mu/2 * ||w - w_global||**2`` keeps a site's
        update near the global model under non-IID sites.
    seed : int
        Seed of the initial weights (the server draws them; sites never initialise).
    device : str
        ``auto`` (a GPU when present, else CPU), ``cpu`` or ``cuda``. Where a *site* trains is
        the site's own choice (``site.device``); it is not part of the plan.
    rounds : int
        Federated training rounds before the segments are found in the embedding space.
    latent_noise : float
        ``tanh`` bottleneck only: standard deviation of Gaussian noise added to the bounded
        embedding while training. A noisy bottleneck carries only a few distinguishable codes,
        so the model spends them on what many features share (the segments). 0 turns it off.
    bottleneck : str
        ``gumbel_softmax`` (default): the embedding is a softmax over ``embed_dim`` codes;
        while training the decoder reads a Gumbel-softmax sample of it at a temperature
        annealed from ``temperature_start`` to ``temperature_end`` over the rounds, so each
        record is reconstructed from (nearly) one code -- a mixture model in which every
        segment, however small, is worth its own code, and whose codes sit at the corners of
        the simplex, where k-means finds them. ``tanh``: a bounded embedding with
        ``latent_noise`` (the first design; its codes crowd the square's corners).
    temperature_start, temperature_end : float
        Gumbel-softmax temperature of the first and last training round (geometric in between).
        Starting soft lets codes split gradually (deterministic annealing) instead of locking
        into the first partition they find.
    local_optimizer : str
        ``sgd`` (plain, no momentum: the SCAFFOLD correction is exact for it) or ``adam``.
    local_steps : int
        Mini-batch steps per site and round, whatever the site's size (0: ``local_epochs``
        passes). Few steps bound how far a site drifts towards its own segments.
    server_optimizer : str
        ``adam`` (FedAdam: :data:`SERVER_ADAM` on the pseudo-gradient, step ``server_lr``) or
        ``average`` (FedAvg: the new weights are the customer-weighted mean).
    server_lr : float
        Step of the server's Adam.
    drift_correction : str
        ``scaffold``: every site adds ``c - c_i`` to each local gradient, where ``c_i`` is its
        mean gradient and ``c`` the customer-weighted mean gradient of all sites, both at the
        previous round's global weights; ``c`` comes from the sites' secure sums
        ``n_i * c_i``. The sum of the sites' objectives is unchanged, but no site descends
        its own segments' gradient alone any more. ``none``: off.
    split_share : float
        ``gumbel_softmax`` only: a code that fewer than this share of all customers use (their
        most likely code, at the global weights) is *dead*; the server re-seeds it by splitting
        the live code with the largest reconstruction loss in two (:func:`split_code`), as
        LBG vector quantisation does. Each site adds its customers' count and loss sum per
        code to its secure sums, so the server learns these totals only. 0 turns it off (and
        the two arrays are not sent).
    split_every : int
        Rounds between two looks at the code usage (at most one split each).
    split_until : float
        Fraction of ``rounds`` after which no code is split any more (the codes settle).
    split_source : str
        Which live code a dead one is split off: ``loss_sum`` (the largest reconstruction-loss
        sum, as LBG: favours big codes) or ``mean_loss`` (the largest loss per customer: a
        code that holds two segments reconstructs its customers worst, whatever its size).
    split_patience : int
        Consecutive looks a code must be dead at before it is split (1: at the first). A code
        that dies for a moment and comes back is left alone; a split costs the round's SCAFFOLD
        correction and perturbs the model.
    clip_norm : float
        Largest norm of a local mini-batch gradient (before SCAFFOLD's correction is added);
        a longer one is scaled down to it (0: off). It ties the local step to a fixed size
        whatever the data's gradient scale, so one ``lr`` suits data sets whose gradients
        differ severalfold.
    candidates : int
        Models trained one after the other, ``rounds`` rounds each, from different initial
        weights (:meth:`candidate_seed`); the one whose mean reconstruction loss over all
        customers -- released by the secure sums of its last training round -- is lowest is
        kept. 1: a single model. Every site trains ``rounds * candidates`` rounds
        (:attr:`training_rounds`); the temperature schedule restarts with each candidate.
    moves : int
        ``gumbel_softmax`` only: merge-and-split moves tried after the candidates (0: none).
        A move empties the smaller of the two codes whose reconstructions are closest
        (:func:`code_reconstructions`; its customers fall to their next code, mostly the
        other of the pair) and re-seeds it as a half of another code (:func:`split_code`),
        trains ``move_rounds`` rounds at ``temperature_end`` and is kept only if its released
        last-round loss is lower than the kept model's. The kept model first trains
        ``move_rounds`` rounds itself (settling), and each move starts from it, so a move has
        trained ``move_rounds`` rounds longer than the loss it is compared with: a move that
        changed nothing would be kept too (harmless: the same partition, trained longer), and a
        move to a slightly worse partition can win by that margin (80 more rounds lower a
        ``data=mixed`` model's loss by about 0.003; a right move by 0.005-0.006 more). The
        codes split are tried by
        decreasing loss per customer (the pair excluded); after them the next closest pair.
        A rejected move is followed by the next one in that order; a kept one by the first
        of the new model's. It undoes the local optimum that cuts one segment in two codes and
        merges two others, which no dead-code split reaches (no code is dead).
    move_rounds : int
        Training rounds of each move before its loss is compared (on ``data=mixed`` a right
        move had a lower loss than the model before after 60 rounds, not after 40).
    numeric_weight : float
        Weight of a numeric feature's squared error (on its standardised value) in the
        reconstruction loss, where each flag's binary and each categorical's cross-entropy
        weighs 1. At 1 a numeric feature weighs as a Gaussian of variance 1/2, more than a
        flag; on ``data=mixed`` that made the Gumbel codes cut the largest segment along its
        life-cycle numbers (docs/BENCHMARKS.md).
    """

    hidden: tuple[int, ...] = (64, 32)
    embed_dim: int = 6
    category_dim: int = 3
    local_epochs: int = 2
    batch_size: int = 128
    lr: float = 0.05
    prox_mu: float = 0.0
    seed: int = 0
    device: str = "auto"
    rounds: int = 200
    latent_noise: float = 0.25
    bottleneck: str = "gumbel_softmax"
    temperature_start: float = 2.0
    temperature_end: float = 0.3
    local_optimizer: str = "sgd"
    local_steps: int = 30
    server_optimizer: str = "adam"
    server_lr: float = 0.03
    drift_correction: str = "scaffold"
    split_share: float = 0.02
    split_every: int = 10
    split_until: float = 0.5
    split_patience: int = 1
    split_source: str = "loss_sum"
    clip_norm: float = 0.2
    numeric_weight: float = 1.0
    candidates: int = 1
    moves: int = 3
    move_rounds: int = 80

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if int(self.rounds) < 1:
            raise ConfigError(f"model.autoencoder.rounds={self.rounds} should be >= 1.")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise ConfigError(f"model.ae_hidden={list(self.hidden)} should list widths >= 1.")
        checks = {"ae_embed_dim": self.embed_dim, "ae_category_dim": self.category_dim,
                  "ae_local_epochs": self.local_epochs, "ae_batch_size": self.batch_size}
        for key, value in checks.items():
            if int(value) < 1:
                raise ConfigError(f"model.{key}={value} should be >= 1.")
        if not self.lr > 0:
            raise ConfigError(f"model.ae_lr={self.lr} should be > 0.")
        if self.latent_noise < 0:
            raise ConfigError(f"model.autoencoder.latent_noise={self.latent_noise} should be "
                              ">= 0.")
        if self.prox_mu < 0:
            raise ConfigError(f"model.ae_prox_mu={self.prox_mu} should be >= 0 (0: FedAvg).")
        if self.device not in DEVICES:
            raise ConfigError(f"model.device={self.device!r} should be one of {DEVICES}.")
        choices = {"bottleneck": (self.bottleneck, BOTTLENECKS),
                   "local_optimizer": (self.local_optimizer, LOCAL_OPTIMIZERS),
                   "server_optimizer": (self.server_optimizer, SERVER_OPTIMIZERS),
                   "drift_correction": (self.drift_correction, DRIFT_CORRECTIONS),
                   "split_source": (self.split_source, SPLIT_SOURCES)}
        for key, (choice, allowed) in choices.items():
            if choice not in allowed:
                raise ConfigError(f"model.autoencoder.{key}={choice!r} should be one of "
                                  f"{allowed}.")
        if not (self.temperature_start > 0 and self.temperature_end > 0):
            raise ConfigError(f"model.autoencoder.temperature_start/_end="
                              f"{self.temperature_start}/{self.temperature_end} should be > 0.")
        if not self.server_lr > 0:
            raise ConfigError(f"model.autoencoder.server_lr={self.server_lr} should be > 0.")
        if not 0 <= self.split_share < 1:
            raise ConfigError(f"model.autoencoder.split_share={self.split_share} should be in "
                              "[0, 1) (0: off).")
        if int(self.split_every) < 1 or not 0 <= self.split_until <= 1:
            raise ConfigError(f"model.autoencoder.split_every={self.split_every} should be >= 1"
                              f" and split_until={self.split_until} in [0, 1].")
        if int(self.split_patience) < 1:
            raise ConfigError(f"model.autoencoder.split_patience={self.split_patience} should "
                              "be >= 1.")
        if not self.clip_norm >= 0:
            raise ConfigError(f"model.autoencoder.clip_norm={self.clip_norm} should be >= 0 "
                              "(0: off).")
        if int(self.local_steps) < 0:
            raise ConfigError(f"model.autoencoder.local_steps={self.local_steps} should be "
                              ">= 0 (0: local_epochs passes).")
        if int(self.candidates) < 1:
            raise ConfigError(f"model.autoencoder.candidates={self.candidates} should be >= 1.")
        if int(self.moves) < 0 or int(self.move_rounds) < 1:
            raise ConfigError(f"model.autoencoder.moves={self.moves} should be >= 0 and "
                              f"model.autoencoder.move_rounds={self.move_rounds} >= 1.")
        if int(self.moves) and int(self.embed_dim) < 3:
            raise ConfigError(f"model.autoencoder.moves={self.moves} needs embed_dim >= 3 (a "
                              f"move empties one of two codes into a split of a third; here "
                              f"embed_dim={self.embed_dim}): set model.autoencoder.moves=0 "
                              f"or a larger embed_dim.")
        if int(self.moves) and not self.code_statistics:
            raise ConfigError(f"model.autoencoder.moves={self.moves} needs the per-code "
                              f"statistics of bottleneck=gumbel_softmax with split_share > 0 "
                              f"(here bottleneck={self.bottleneck}, split_share="
                              f"{self.split_share}): set model.autoencoder.moves=0 too.")
        if not self.numeric_weight > 0:
            raise ConfigError(f"model.autoencoder.numeric_weight={self.numeric_weight} should "
                              "be > 0.")

    @property
    def control_variates(self) -> bool:
        """Whether ``ae_train`` carries SCAFFOLD's gradient sums (instruction and reply)."""
        return self.drift_correction == "scaffold"

    @property
    def code_statistics(self) -> bool:
        """Whether ``ae_train`` replies carry per-code customer counts and loss sums."""
        return self.bottleneck == "gumbel_softmax" and self.split_share > 0

    @property
    def candidate_rounds(self) -> int:
        """Training rounds of all candidates: ``rounds`` for each."""
        return int(self.rounds) * int(self.candidates)

    @property
    def training_rounds(self) -> int:
        """Training rounds of the whole run: the candidates', the kept model's settling, moves."""
        moves = int(self.moves)
        return self.candidate_rounds + (moves + 1) * int(self.move_rounds) if moves else \
            self.candidate_rounds

    def code_statistics_released(self, done_rounds: int) -> bool:
        """Whether the training round that completes ``done_rounds`` rounds releases code sums.

        ``done_rounds`` counts the run's ``ae_train`` rounds, this one included (1-based). Only
        the rounds whose per-code counts and loss sums the server's rules read release them: a
        dead-code look (:meth:`split_round`, before a candidate's last round), a candidate's
        last round when moves follow (the kept model's statistics choose the first move), and
        the last round of the settling and of each move. A site decides it from the plan and
        its own count of training rounds and sends zeros of the same shapes in every other
        round (the default plan: 15 of 520 rounds instead of all).
        """
        if not self.code_statistics:
            return False
        done = int(done_rounds)
        if done > self.candidate_rounds:
            return (done - self.candidate_rounds) % int(self.move_rounds) == 0
        within = (done - 1) % int(self.rounds) + 1
        if within == int(self.rounds):
            return bool(int(self.moves))
        return self.split_round(within)

    def candidate_seed(self, candidate: int) -> int:
        """Seed of candidate ``candidate``'s initial weights (candidate 0: ``seed`` itself)."""
        if candidate == 0:
            return int(self.seed)
        return int(np.random.default_rng([int(self.seed), int(candidate), 3]).integers(2**31))

    def split_round(self, done_rounds: int) -> bool:
        """Whether the server looks for dead codes after ``done_rounds`` rounds of a candidate."""
        return (self.code_statistics and done_rounds % int(self.split_every) == 0
                and done_rounds <= self.split_until * int(self.rounds))

    def temperature(self, train_round: int) -> float:
        """Gumbel-softmax temperature of training round ``train_round`` (0-based, in the run).

        The schedule restarts with each candidate (``train_round`` modulo ``rounds``); the
        merge-and-split moves' rounds (after the candidates') train at ``temperature_end``.
        """
        if int(train_round) >= self.candidate_rounds:
            return float(self.temperature_end)
        within = max(0, int(train_round)) % int(self.rounds)
        fraction = min(1.0, within / max(1, int(self.rounds) - 1))
        return float(self.temperature_start
                     * (self.temperature_end / self.temperature_start) ** fraction)

    def architecture(self) -> dict[str, Any]:
        """Return what fixes the flat parameter layout (recorded in plans and model files)."""
        return {"id": ARCHITECTURE_ID, "hidden": [int(h) for h in self.hidden],
                "embed_dim": int(self.embed_dim), "category_dim": int(self.category_dim),
                "bottleneck": self.bottleneck}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = asdict(self)
        out["hidden"] = [int(h) for h in self.hidden]
        return out

    def plan_json(self) -> str:
        """Canonical JSON of everything the server announces (all but ``device``)."""
        out = self.to_dict()
        del out["device"]
        return json.dumps(out, sort_keys=True)

    @classmethod
    def from_plan_json(cls, text: str, *, device: str = "auto") -> AESettings:
        """Parse :meth:`plan_json` output; raises ``ValueError`` on any malformation."""
        raw = json.loads(text)
        known = {f.name for f in fields(cls)} - {"device"}
        if not isinstance(raw, dict) or set(raw) != known:
            got = sorted(raw) if isinstance(raw, dict) else raw
            raise ValueError(f"autoencoder plan keys {got!r}; expected {sorted(known)}")
        for name, value in raw.items():
            if name in _CHOICE_FIELDS:
                if not isinstance(value, str):
                    raise ValueError(f"autoencoder plan {name}={value!r}")
                continue
            values = value if name == "hidden" else [value]
            if not isinstance(values, list) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                raise ValueError(f"autoencoder plan {name}={value!r}")
        try:
            return cls(**{**raw, "hidden": tuple(raw["hidden"]), "device": device})
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc


_CHOICE_FIELDS = ("bottleneck", "local_optimizer", "server_optimizer", "drift_correction",
                  "split_source")
"""The settings that are names, not numbers, in a plan."""


def resolve_device(device: str) -> torch.device:
    """Map ``auto`` to CUDA when a GPU is visible, else CPU; refuse ``cuda`` without one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda but torch sees no GPU here; use auto or cpu.")
    return torch.device(device)


class TabularAutoencoder(nn.Module):
    """Encoder/decoder over one layout; see the module docstring.

    Parameters
    ----------
    layout : TabularLayout
    settings : AESettings
    """

    def __init__(self, layout: TabularLayout, settings: AESettings) -> None:
        super().__init__()
        self.layout = layout
        self.settings = settings
        self.vocab = [len(c) for c in layout.categorical]
        self.cat_embeddings = nn.ModuleList(
            nn.Embedding(v, min(settings.category_dim, v)) for v in self.vocab)
        n_in = len(layout.numeric) + len(layout.boolean) + sum(
            min(settings.category_dim, v) for v in self.vocab)
        widths = [n_in, *[int(h) for h in settings.hidden]]
        enc: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            enc += [nn.Linear(a, b), nn.ELU()]
        enc.append(nn.Linear(widths[-1], settings.embed_dim))
        self.encoder = nn.Sequential(*enc)
        back = [settings.embed_dim, *reversed([int(h) for h in settings.hidden])]
        dec: list[nn.Module] = []
        for a, b in itertools.pairwise(back):
            dec += [nn.Linear(a, b), nn.ELU()]
        n_out = len(layout.numeric) + len(layout.boolean) + sum(self.vocab)
        dec.append(nn.Linear(back[-1], n_out))
        self.decoder = nn.Sequential(*dec)

    # -- flat parameter vector (what travels) -----------------------------------------------

    def n_params(self) -> int:
        """Length of the flat parameter vector."""
        return int(sum(p.numel() for p in self.parameters()))

    def get_flat(self) -> NDArray[np.float64]:
        """Return all parameters as one float64 vector (fixed order of ``parameters()``)."""
        return np.concatenate([p.detach().cpu().double().reshape(-1).numpy()
                               for p in self.parameters()])

    def set_flat(self, flat: NDArray[np.float64]) -> None:
        """Load parameters from :meth:`get_flat`'s layout (length and finiteness checked)."""
        flat = np.asarray(flat, dtype=np.float64)
        if flat.shape != (self.n_params(),) or not np.all(np.isfinite(flat)):
            raise DataError(f"autoencoder parameters of shape {flat.shape} (or non-finite); "
                            f"this architecture has {self.n_params()}.")
        offset = 0
        with torch.no_grad():
            for p in self.parameters():
                n = p.numel()
                p.copy_(torch.from_numpy(flat[offset:offset + n]).reshape(p.shape).to(p))
                offset += n

    # -- forward ------------------------------------------------------------------------------

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Network input from a standardised record batch; also the category indices."""
        lay = self.layout
        parts = [x[:, list(lay.numeric)], x[:, list(lay.boolean)]]
        indices = []
        for cols, emb in zip(lay.categorical, self.cat_embeddings, strict=True):
            idx = torch.argmax(x[:, list(cols)], dim=1)
            indices.append(idx)
            parts.append(emb(idx))
        return torch.cat(parts, dim=1), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding of a standardised record batch, shape (batch, embed_dim).

        ``tanh``: the bounded code; ``gumbel_softmax``: the code probabilities.
        """
        inputs, _ = self._inputs(x)
        return self._code(self.encoder(inputs))

    def _code(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the noiseless bottleneck: code probabilities or the bounded code."""
        if self.settings.bottleneck == "gumbel_softmax":
            return torch.softmax(logits, dim=1)
        return torch.tanh(logits)

    def loss(self, x: torch.Tensor, noise: torch.Generator | None = None, *,
             temperature: float = 1.0) -> torch.Tensor:
        """Mean reconstruction loss per record and original feature (each type its own loss).

        With ``noise`` (training) the bottleneck is sampled from that generator: ``tanh``
        gets ``latent_noise`` Gaussian noise, ``gumbel_softmax`` becomes a Gumbel-softmax
        sample at ``temperature``. Without, the decoder reads :meth:`encode`'s code.
        """
        inputs, indices = self._inputs(x)
        logits = self.encoder(inputs)
        if self.settings.bottleneck == "gumbel_softmax":
            if noise is not None:
                u = torch.rand(logits.shape, generator=noise, device=logits.device,
                               dtype=logits.dtype).clamp(1e-6, 1.0 - 1e-6)
                logits = (logits - torch.log(-torch.log(u))) / temperature
            code = torch.softmax(logits, dim=1)
        else:
            code = torch.tanh(logits)
            if noise is not None and self.settings.latent_noise > 0:
                # A noisy, bounded bottleneck carries only a few distinguishable codes.
                code = code + self.settings.latent_noise * torch.randn(
                    code.shape, generator=noise, device=code.device, dtype=code.dtype)
        return self._record_losses(self.decoder(code), x, indices).mean()

    def code_losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each record's most likely code and its reconstruction loss from :meth:`encode`'s code.

        Returns
        -------
        code : Tensor of shape (batch,), int64
        loss : Tensor of shape (batch,)
            Per record, on the scale of :meth:`loss` (whose noiseless value is its mean).
        """
        inputs, indices = self._inputs(x)
        logits = self.encoder(inputs)
        return (torch.argmax(logits, dim=1),
                self._record_losses(self.decoder(self._code(logits)), x, indices))

    def _record_losses(self, out: torch.Tensor, x: torch.Tensor,
                       indices: list[torch.Tensor]) -> torch.Tensor:
        """Reconstruction loss per record, averaged over the original features."""
        lay = self.layout
        n_num, n_bool = len(lay.numeric), len(lay.boolean)
        total = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
        if n_num:
            total = total + float(self.settings.numeric_weight) * (
                (out[:, :n_num] - x[:, list(lay.numeric)]) ** 2).sum(dim=1)
        if n_bool:
            total = total + nn.functional.binary_cross_entropy_with_logits(
                out[:, n_num:n_num + n_bool], x[:, list(lay.boolean)],
                reduction="none").sum(dim=1)
        start = n_num + n_bool
        for v, idx in zip(self.vocab, indices, strict=True):
            total = total + nn.functional.cross_entropy(out[:, start:start + v], idx,
                                                        reduction="none")
            start += v
        return total / max(1, lay.n_original)


def code_reconstructions(params: NDArray[np.float64], *, layout: TabularLayout,
                         settings: AESettings) -> NDArray[np.float64]:
    """Return what each code of a ``gumbel_softmax`` model reconstructs, comparably.

    Row ``j`` is the decoder's output for the pure code ``j``: numbers (standardised, times
    ``sqrt(numeric_weight)``), flag probabilities and category probabilities, so the squared
    distance of two rows weighs the types as the loss roughly does.

    Returns
    -------
    ndarray of shape (embed_dim, n_columns)
    """
    model = TabularAutoencoder(layout, settings)
    model.set_flat(params)
    with torch.no_grad():
        out = model.decoder(torch.eye(int(settings.embed_dim))).double()
    n_num, n_bool = len(layout.numeric), len(layout.boolean)
    parts = [out[:, :n_num] * float(np.sqrt(settings.numeric_weight)),
             torch.sigmoid(out[:, n_num:n_num + n_bool])]
    start = n_num + n_bool
    for v in model.vocab:
        parts.append(torch.softmax(out[:, start:start + v], dim=1))
        start += v
    return torch.cat(parts, dim=1).numpy()


SPLIT_PERTURBATION = (0.1, 0.3)
"""Relative size of the opposite random nudges :func:`split_code` gives the two halves of a
split code: in the encoder's output row and in the decoder's input column (each times that
row's or column's RMS entry). The decoder's nudge is what separates them: two halves that
reconstruct alike get no gradient that routes records apart."""


def split_code(
    params: NDArray[np.float64],
    *,
    layout: TabularLayout,
    settings: AESettings,
    dead: int,
    source: int,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """Re-seed the unused code ``dead`` as one half of the code ``source`` (LBG-style split).

    Both halves get ``source``'s encoder row and decoder column with opposite random nudges
    (:data:`SPLIT_PERTURBATION`), and each half's logit is lowered by ``log 2``, so the pair
    holds the probability ``source`` held and the model computes nearly what it did. Training
    then moves the halves apart if ``source``'s records have structure to split.

    Parameters
    ----------
    params : ndarray of shape (n_params,)
        Global weights of a ``gumbel_softmax`` model.
    layout : TabularLayout
    settings : AESettings
    dead, source : int
        Different code indices in ``[0, embed_dim)``.
    rng : numpy.random.Generator
        The nudges' directions.

    Returns
    -------
    ndarray of shape (n_params,)
    """
    m = int(settings.embed_dim)
    if settings.bottleneck != "gumbel_softmax" or not (0 <= dead < m and 0 <= source < m) \
            or dead == source:
        raise ConfigError(f"split_code: codes dead={dead}, source={source} of {m} "
                          f"({settings.bottleneck} bottleneck); expected two different codes "
                          "of a gumbel_softmax bottleneck.")
    model = TabularAutoencoder(layout, settings)
    model.set_flat(params)
    out_layer, in_layer = model.encoder[-1], model.decoder[0]
    assert isinstance(out_layer, nn.Linear) and isinstance(in_layer, nn.Linear)
    with torch.no_grad():
        # rows of the encoder's output layer, columns (rows of the transposed view) of the
        # decoder's input layer
        for weight, scale in ((out_layer.weight, SPLIT_PERTURBATION[0]),
                              (in_layer.weight.T, SPLIT_PERTURBATION[1])):
            row = weight[source].clone()
            nudge = torch.from_numpy(rng.standard_normal(row.shape[0])).to(row)
            nudge *= scale * row.norm() / np.sqrt(row.shape[0])
            weight[dead] = row + nudge
            weight[source] = row - nudge
        out_layer.bias[source] -= float(np.log(2.0))
        out_layer.bias[dead] = out_layer.bias[source]
    return model.get_flat()


def standardise(transformed: NDArray[np.float64], layout: TabularLayout, mean: NDArray[np.float64],
                std: NDArray[np.float64]) -> NDArray[np.float32]:
    """Network input: numeric columns z-scored with the global scaling, the others as they are.

    Parameters
    ----------
    transformed : ndarray of shape (n_samples, n_columns)
        Records after their declared transforms.
    layout : TabularLayout
    mean, std : ndarray of shape (n_columns,)
        The global scaling of the moments round.
    """
    x = np.array(transformed, dtype=np.float64, copy=True)
    num = list(layout.numeric)
    if num:
        x[:, num] = (x[:, num] - mean[num]) / std[num]
    return x.astype(np.float32)


def build_model(layout: TabularLayout, settings: AESettings) -> TabularAutoencoder:
    """Build the model with the seeded initial weights every party can rebuild (CPU, float32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(settings.seed))
        return TabularAutoencoder(layout, settings)


def n_params(layout: TabularLayout, settings: AESettings) -> int:
    """Length of the flat parameter vector for ``layout`` and ``settings`` (public)."""
    return TabularAutoencoder(layout, settings).n_params()


@dataclass
class LocalTraining:
    """What one site's local training produced (only ``params`` and sums ever leave, summed).

    Attributes
    ----------
    params : ndarray of shape (n_params,)
        The site's trained parameters.
    loss_sum : float
        Sum over the site's records of the reconstruction loss at the *global* parameters
        (before training): the round's federated loss, once summed and divided by the count.
    n_records : int
    seconds : float
        CPU-side wall time of the local training.
    steps : int
        Optimiser steps taken.
    gradient_sum : ndarray of shape (n_params,) or None
        With control variates: the sum over the site's records of the training loss's gradient
        at the global parameters (``n_i * c_i`` of the next round's SCAFFOLD correction).
    code_counts, code_loss_sums : ndarray of shape (embed_dim,) or None
        With :attr:`AESettings.code_statistics`: per code, the site's customers whose most
        likely code it is at the global parameters, and the sum of their reconstruction losses
        (the dead-code split's statistics, summed securely).
    """

    params: NDArray[np.float64]
    loss_sum: float
    n_records: int
    seconds: float
    steps: int = 0
    history: list[float] = field(default_factory=list)
    gradient_sum: NDArray[np.float64] | None = None
    code_counts: NDArray[np.float64] | None = None
    code_loss_sums: NDArray[np.float64] | None = None


def mean_gradient(
    model: TabularAutoencoder, data: torch.Tensor, noise: torch.Generator, *,
    temperature: float, chunk: int = 4096,
) -> list[torch.Tensor]:
    """Mean over ``data`` of the training loss's gradient at ``model``'s current parameters."""
    n = data.shape[0]
    total = [torch.zeros_like(p) for p in model.parameters()]
    for start in range(0, n, chunk):
        batch = data[start:start + chunk]
        model.zero_grad(set_to_none=True)
        (model.loss(batch, noise, temperature=temperature) * (batch.shape[0] / n)).backward()
        for t, p in zip(total, model.parameters(), strict=True):
            if p.grad is not None:
                t.add_(p.grad)
    model.zero_grad(set_to_none=True)
    return total


def _gradient_noise(settings: AESettings, train_round: int,
                    device: torch.device) -> torch.Generator:
    """Bottleneck noise of a site's SCAFFOLD gradient pass in ``train_round`` (reproducible)."""
    seed = int(np.random.default_rng([int(settings.seed), int(train_round), 1]).integers(2**62))
    return torch.Generator(device=device).manual_seed(seed)


def _unflatten(flat: NDArray[np.float64], model: TabularAutoencoder) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped (and placed) like ``model``'s parameters."""
    out, offset = [], 0
    for p in model.parameters():
        n = p.numel()
        out.append(torch.from_numpy(np.ascontiguousarray(flat[offset:offset + n]))
                   .reshape(p.shape).to(p))
        offset += n
    return out


def local_train(
    global_params: NDArray[np.float64],
    x: NDArray[np.float32],
    *,
    layout: TabularLayout,
    settings: AESettings,
    rng: np.random.Generator,
    train_round: int = 0,
    anchor: NDArray[np.float64] | None = None,
    control: NDArray[np.float64] | None = None,
) -> LocalTraining:
    """Train from the global parameters on one site's standardised records.

    Parameters
    ----------
    global_params : ndarray of shape (n_params,)
    x : ndarray of shape (n_samples, n_columns)
        :func:`standardise` output.
    layout : TabularLayout
    settings : AESettings
        Everything but the server's part (``server_*``, ``rounds`` beyond the temperature).
    rng : numpy.random.Generator
        Mini-batch order and bottleneck noise.
    train_round : int, default=0
        Index of this training round in the run: sets the Gumbel-softmax temperature.
    anchor, control : ndarray of shape (n_params,), optional
        SCAFFOLD (``drift_correction=scaffold``): the previous round's global parameters and
        all sites' mean gradient ``c`` there. Each local gradient gets ``c - c_i`` added,
        ``c_i`` this site's mean gradient at ``anchor``. A zero ``control`` (the first round)
        means no correction. The site's own gradient sum at ``global_params`` is returned
        for the next round's ``c``.
    """
    started = time.perf_counter()
    device = resolve_device(settings.device)
    model = TabularAutoencoder(layout, settings)
    model.set_flat(global_params)
    model.to(device)
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    n = data.shape[0]
    temperature = settings.temperature(train_round)
    code_counts = np.zeros(settings.embed_dim)
    code_loss_sums = np.zeros(settings.embed_dim)
    with torch.no_grad():
        for i in range(0, n, 8192):
            codes, losses = model.code_losses(data[i:i + 8192])
            code_counts += np.bincount(codes.cpu().numpy(), minlength=settings.embed_dim)
            code_loss_sums += np.bincount(codes.cpu().numpy(), minlength=settings.embed_dim,
                                          weights=losses.double().cpu().numpy())
    loss_sum = float(code_loss_sums.sum())
    noise = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
    gradient_sum = None
    correction: list[torch.Tensor] | None = None
    if settings.control_variates:
        own = mean_gradient(model, data, _gradient_noise(settings, train_round, device),
                            temperature=temperature)
        gradient_sum = n * torch.cat([g.reshape(-1) for g in own]).double().cpu().numpy()
        if control is not None and anchor is not None and np.any(control != 0):
            # c_i exactly as this site sent it last round (same point, noise and temperature),
            # so the corrections of all sites sum to zero.
            at_anchor = TabularAutoencoder(layout, settings)
            at_anchor.set_flat(anchor)
            at_anchor.to(device)
            before = max(0, train_round - 1)
            mine = mean_gradient(at_anchor, data, _gradient_noise(settings, before, device),
                                 temperature=settings.temperature(before))
            correction = [c - g for c, g in
                          zip(_unflatten(control, model), mine, strict=True)]
    anchor_params = [p.detach().clone() for p in model.parameters()]
    if settings.local_optimizer == "sgd":
        optimiser: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
    else:
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n_steps = int(settings.local_steps) or settings.local_epochs * -(-n // settings.batch_size)
    steps = 0
    history = []
    epoch_loss, epoch_count = 0.0, 0
    order = torch.from_numpy(rng.permutation(n)).to(device)
    start = 0
    while steps < n_steps:
        if start >= n:  # a pass is over: a fresh order
            history.append(epoch_loss / max(1, epoch_count))
            epoch_loss, epoch_count = 0.0, 0
            order, start = torch.from_numpy(rng.permutation(n)).to(device), 0
        batch = data[order[start:start + settings.batch_size]]
        start += settings.batch_size
        loss = model.loss(batch, noise, temperature=temperature)
        if settings.prox_mu > 0:
            prox = sum(((p - a) ** 2).sum() for p, a in
                       zip(model.parameters(), anchor_params, strict=True))
            loss = loss + 0.5 * settings.prox_mu * prox
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if settings.clip_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), float(settings.clip_norm))
        if correction is not None:
            for p, c in zip(model.parameters(), correction, strict=True):
                if p.grad is not None:
                    p.grad.add_(c)
        optimiser.step()
        steps += 1
        epoch_loss += float(loss.item()) * batch.shape[0]
        epoch_count += batch.shape[0]
    history.append(epoch_loss / max(1, epoch_count))
    keep = settings.code_statistics
    return LocalTraining(params=model.get_flat(), loss_sum=loss_sum, n_records=n,
                         seconds=time.perf_counter() - started, steps=steps, history=history,
                         gradient_sum=gradient_sum, code_counts=code_counts if keep else None,
                         code_loss_sums=code_loss_sums if keep else None)


def embed(
    params: NDArray[np.float64],
    x: NDArray[np.float32],
    *,
    layout: TabularLayout,
    settings: AESettings,
) -> NDArray[np.float64]:
    """Embeddings of standardised records under ``params``, shape (n_samples, embed_dim)."""
    device = resolve_device(settings.device)
    model = TabularAutoencoder(layout, settings)
    model.set_flat(params)
    model.to(device).eval()
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = []
    with torch.no_grad():
        for i in range(0, data.shape[0], 16384):
            out.append(model.encode(data[i:i + 16384].to(device)).double().cpu().numpy())
    if not out:
        return np.zeros((0, settings.embed_dim))
    return np.concatenate(out)
