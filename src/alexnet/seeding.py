"""Common random numbers: within one seed, every arm of an ablation draws the same random numbers wherever
the arm does not change what is drawn.

A run's ``seed`` is split into independent streams, one per use, each keyed by a name:

- ``init/<layer>``: the initial weights of each layer (so a layer whose shape an arm keeps starts from the
  same weights in both arms; a tanh arm scales the same normal draws by tanh's gain instead of ReLU's);
- ``order/<epoch>``: the order of the training images in each epoch;
- ``augment/<epoch>``: section 4.1's crop offsets, mirror flags and PCA colour draws of each epoch, drawn
  for every image whether or not the arm uses them (an arm without crops still sees the same mirrors);
- the global generator, seeded by Lightning, is left to dropout alone.

Pairing arms this way removes from their difference the noise that the draws would otherwise add (the
variance-reduction technique of common random numbers). Deriving a stream from (seed, name, epoch) instead
of advancing one generator also makes a resumed run draw exactly what an uninterrupted one draws.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for the stream ``names`` of run seed ``seed``: independent of every other stream."""
    key = "/".join(str(n) for n in (seed, *names)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *names: object) -> torch.Generator:
    """A CPU generator for the stream ``names`` (draws are made on the CPU, then moved: a few per image)."""
    return torch.Generator().manual_seed(stream_seed(seed, *names))
