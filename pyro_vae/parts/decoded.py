r"""p_θ(x | z) evaluated in blocks of rows: the decoder's outputs of many draws never held at once.

The model's observed site is ``likelihood(decoder(z))``. Scoring many draws
(K particles for each of B examples: K·B rows of z) without gradients, the
decoder's outputs of every row would be written out and read back by the
likelihood's density, one pass each over K·B·D numbers; on a CPU those passes
run at memory speed once the outputs outgrow the cache. :class:`DecodedInBlocks`
is the same distribution, with ``log_prob`` computed block by block::

    log p(x | z)[rows] = likelihood(decoder(z[rows])).log_prob(x[rows])

for blocks of about ``rows`` rows of z (a slice of one batch dimension, all of
the dimensions after it), so each block's outputs are read by the density while
they are still in cache. Each block calls the parts' own ``forward`` and
``log_prob``, so a subclass or plugin is scored by its own density; rows are
independent, so each entry is what one call on all of z gives (up to a
matrix multiply's rounding, which may depend on how many rows it takes).
Everything else (``mean``, ``sample``, the parts' own attributes through
:attr:`DecodedInBlocks.whole`) is the distribution of all of z, built when first asked for.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator

import pyro.distributions as dist
import torch

ROWS = 2048  # rows of z per block on a CPU: a block's decoder outputs are still in cache when the density reads them


def block_slices(shape: torch.Size, rows: int) -> Iterator[tuple[slice | int, ...]]:
    """Index tuples over the leading dims of ``shape`` (a batch shape): blocks of about ``rows`` entries.

    The first dim whose trailing dims together hold at most ``rows`` entries is
    sliced in steps of ``rows`` // (their count); every dim before it is taken one
    index at a time, every dim after it whole. Together the blocks cover each
    entry once, in order.
    """
    if not shape:
        yield ()
        return
    for dim in range(len(shape)):
        inner = math.prod(shape[dim + 1 :])
        if inner <= rows:
            break
    step = max(1, rows // inner)
    for prefix in itertools.product(*(range(size) for size in shape[:dim])):
        for start in range(0, shape[dim], step):
            yield (*prefix, slice(start, start + step))


def _take(value: torch.Tensor, index: tuple[slice | int, ...], batch_dims: int, event_dims: int) -> torch.Tensor:
    """``value`` at the batch ``index``, value broadcast against a batch of ``batch_dims`` dims: a dim of size 1
    (or missing) is kept whole (size 1), so the block broadcasts as the whole did."""
    shape = value.shape[: value.dim() - event_dims]
    missing = batch_dims - len(shape)
    keys: list[slice | int] = []
    for dim, key in enumerate(index):
        if dim < missing:
            continue
        if shape[dim - missing] == 1:
            keys.append(slice(None) if isinstance(key, slice) else 0)
        else:
            keys.append(key)
    return value[tuple(keys)]


class DecodedInBlocks(dist.TorchDistribution):
    """``make(z)``: a distribution over x whose batch shape is z's (z: (…, d)), with ``log_prob`` by blocks of rows.

    ``make`` maps a block of z (…, d) to the likelihood's distribution for it;
    ``rows``: rows of z per block (:func:`block_slices`). See the module docstring.
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        make: Callable[[torch.Tensor], dist.TorchDistribution],
        z: torch.Tensor,
        rows: int = ROWS,
    ):
        self.make, self.z, self.rows = make, z, rows
        self._whole: dist.TorchDistribution | None = None
        one = make(z[(0,) * (z.dim() - 1)].view(*(1,) * (z.dim() - 1), z.shape[-1]))
        self._support, self._row_wise = one.support, one.batch_shape == (1,) * (z.dim() - 1)
        super().__init__(z.shape[:-1], one.event_shape)

    @staticmethod
    def of(
        make: Callable[[torch.Tensor], dist.TorchDistribution], z: torch.Tensor, rows: int = ROWS
    ) -> dist.TorchDistribution:
        """``DecodedInBlocks(make, z, rows)`` where it saves a pass over memory (no gradient recorded, a CPU, more
        than ``rows`` rows, a block's distribution with z's batch shape); ``make(z)`` otherwise."""
        if torch.is_grad_enabled() or z.device.type != "cpu" or z.shape[:-1].numel() <= rows:
            return make(z)
        blocked = DecodedInBlocks(make, z, rows)
        return blocked if blocked._row_wise else make(z)

    @property
    def support(self):
        """The likelihood's own support."""
        return self._support

    @property
    def whole(self) -> dist.TorchDistribution:
        """``make(z)``: the distribution of every row at once (built on first use)."""
        if self._whole is None:
            self._whole = self.make(self.z)
        return self._whole

    @property
    def mean(self) -> torch.Tensor:
        return self.whole.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.whole.variance

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        return self.whole.sample(sample_shape)

    def expand(self, batch_shape, _instance=None) -> "DecodedInBlocks":
        z = self.z.expand(*batch_shape, self.z.shape[-1])
        return DecodedInBlocks(self.make, z, self.rows)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log p(x | z) of ``value`` (broadcastable against batch + event shape), block by block: batch shape."""
        event = len(self.event_shape)
        batch = torch.broadcast_shapes(self.batch_shape, value.shape[: value.dim() - event])
        if batch != self.batch_shape:
            return self.whole.log_prob(value)
        out = self.z.new_empty(batch)
        for index in block_slices(batch, self.rows):  # each block's outputs freed before the next block's are made
            out[index] = self.make(self.z[index]).log_prob(_take(value, index, len(batch), event))
        return out
