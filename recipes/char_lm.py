"""Char-level language modelling on the Python standard library's own source (a small GPT).

The corpus ships with every Python: the ``.py`` files at the top of the standard library's
directory (``sysconfig.get_paths()["stdlib"]``, where the ``os`` module lives), taken in sorted
name order until ``max_bytes`` bytes. Tokens are bytes (vocabulary 256), so encoding is lossless
for any text. The last ``val_fraction`` of the byte stream is the validation set.

Each rank trains on its own shard of the training windows (window ``i`` goes to rank
``i mod world``; every shard is cut to the smallest one, so all ranks run the same number of
batches): use ``Trainer(use_distributed_sampler=False)``. Validation windows are sharded the same way.

Run::

    python -m recipes.char_lm fit --config configs/char_lm/base.yaml --config configs/char_lm/diloco.yaml
    python -m recipes.char_lm fit --config configs/char_lm/base.yaml --config configs/char_lm/async_dn_dylu.yaml

The model (:class:`CharGPT`) is a pre-norm decoder-only transformer with learned positions and a
tied output layer, about 0.8M parameters with the defaults (4 layers, width 128, 4 heads, context 64).
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import lightning_localsgd  # noqa: F401  (registers the strategy names "localsgd", "async_localsgd", ...)

from .data import shuffled_loader

VOCAB_SIZE = 256


# ====================================================================== corpus and encoding
def encode(text: str) -> Tensor:
    """UTF-8 bytes as token ids (``int64``), vocabulary 256."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: Tensor | list[int]) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(max_bytes: int = 2_000_000, root: str | Path | None = None) -> tuple[bytes, list[str]]:
    """The first ``max_bytes`` bytes of the sorted top-level ``*.py`` files of the standard library.

    Deterministic for a given Python installation; returns the bytes and the file names used.
    """
    root = Path(root) if root is not None else stdlib_dir()
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .py files in {root}: is this a Python standard library directory?")
    chunks, names, total = [], [], 0
    for p in files:
        data = p.read_bytes()
        chunks.append(data)
        names.append(p.name)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes], names


class Windows(Dataset):
    """Non-overlapping windows of ``context + 1`` tokens (input = first ``context``, target = last)."""

    def __init__(self, tokens: Tensor, context: int, indices: list[int]) -> None:
        self.tokens, self.context, self.indices = tokens, context, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = self.indices[i] * self.context
        chunk = self.tokens[start : start + self.context + 1]
        return chunk[:-1], chunk[1:]


def shard(num_windows: int, rank: int, world: int) -> list[int]:
    """Window ids of ``rank``: ``rank, rank + world, ...``, cut to ``num_windows // world`` (equal shards)."""
    per_rank = num_windows // world
    return [rank + world * k for k in range(per_rank)]


class StdlibCorpusDataModule(LightningDataModule):
    """Byte-level windows of the standard library's source, one shard per rank.

    Args:
        context: tokens per training example.
        batch_size: windows per batch, per rank.
        eval_batch_size: windows per validation batch.
        max_bytes: corpus size (bytes of source read, from the sorted file list).
        val_fraction: the last fraction of the corpus used for validation.
        max_val_windows: at most this many validation windows in total (spread over the ranks); ``None``: all.
        seed: of the training order (each rank shuffles with ``seed + rank``).
        root: a directory of ``.py`` files instead of the standard library (tests).
    """

    def __init__(
        self,
        context: int = 64,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_bytes: int = 2_000_000,
        val_fraction: float = 0.1,
        max_val_windows: int | None = 512,
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1) such as 0.1, got {val_fraction!r}")
        self.context, self.batch_size, self.eval_batch_size = context, batch_size, eval_batch_size
        self.max_bytes, self.val_fraction, self.max_val_windows = max_bytes, val_fraction, max_val_windows
        self.seed, self.root = seed, root
        self.rank, self.world = 0, 1
        self.files: list[str] = []
        self.train_tokens = self.val_tokens = torch.empty(0, dtype=torch.long)

    def prepare(self, rank: int = 0, world: int = 1) -> None:
        """Read and split the corpus for ``rank`` of ``world`` (``setup`` calls it with the trainer's)."""
        self.rank, self.world = rank, world
        data, self.files = stdlib_corpus(self.max_bytes, self.root)
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        cut = int(len(tokens) * (1 - self.val_fraction))
        self.train_tokens, self.val_tokens = tokens[:cut], tokens[cut:]

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.prepare(rank, world)

    def num_windows(self, tokens: Tensor) -> int:
        return max(0, (len(tokens) - 1) // self.context)

    def train_dataset(self) -> Windows:
        indices = shard(self.num_windows(self.train_tokens), self.rank, self.world)
        return Windows(self.train_tokens, self.context, indices)

    def val_dataset(self) -> Windows:
        n = self.num_windows(self.val_tokens)
        if self.max_val_windows is not None:
            n = min(n, self.max_val_windows)
        return Windows(self.val_tokens, self.context, shard(n, self.rank, self.world))

    def full_val_dataset(self) -> Windows:
        """Every validation window (for evaluating one model on one process)."""
        n = self.num_windows(self.val_tokens)
        if self.max_val_windows is not None:
            n = min(n, self.max_val_windows)
        return Windows(self.val_tokens, self.context, list(range(n)))

    def train_dataloader(self) -> DataLoader:
        # resumable mid-epoch (see recipes.data.shuffled_loader); each rank its own order
        return shuffled_loader(self.train_dataset(), self.batch_size, seed=self.seed + self.rank, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset(), batch_size=self.eval_batch_size)


# ====================================================================== model
class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.n_head, self.dropout = n_head, dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharGPT(LightningModule):
    """A small GPT over bytes, trained with AdamW (the inner optimizer of DiLoCo / async Local-SGD).

    Args:
        n_layer, n_head, d_model: transformer size (defaults: 4, 4, 128: about 0.8M parameters).
        context: maximum sequence length (learned positions).
        dropout: attention dropout.
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear learning-rate warm-up of the inner optimizer (per worker).
    """

    def __init__(
        self,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        context: int = 64,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head})")
        self.save_hyperparameters()
        self.tok = nn.Embedding(VOCAB_SIZE, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.t()  # tied output layer

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_bpc", loss / math.log(2))  # bits per byte

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and n != "pos"]
        no_decay = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and n != "pos")]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        if hp.warmup_steps <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / hp.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(args: list[str] | None = None, run: bool = True, **cli_kwargs: Any) -> LightningCLI:
    """``python -m recipes.char_lm fit --config ...``; ``args`` instead of ``sys.argv`` (tests)."""
    cli_kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return LightningCLI(CharGPT, StdlibCorpusDataModule, args=args, run=run, **cli_kwargs)


if __name__ == "__main__":
    main()
