"""Training samples: fixed-length windows over the token stream, a seeded order, and data-parallel sharding.

As GPT-NeoX's ``GPTDataset``: documents are concatenated (each already ends with EOD), and sample j of an epoch is
the window of ``seq_len + 1`` tokens starting at token ``j·seq_len`` — consecutive windows share one token, so
every token is a target exactly once; an epoch has ``(tokens − 1) // seq_len`` samples. The windows are visited
in a seeded random order that is re-drawn each epoch from (seed, epoch). A global sample index therefore names
one window for ever, which makes it the exact and O(1) resume position of a run.

This is not bit-identical to GPT-NeoX's sample order for Pythia (which also shuffles documents with its own RNG
and C++ index builder); it keeps Pythia's document order, which that corpus already fixes by pre-shuffling.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from memoryformer.data.indexed_dataset import IndexedDataset


class PackedSamples(Dataset):
    """Windows of ``seq_len + 1`` tokens over documents ``documents`` (default: all) of an indexed dataset.

    ``len()`` is the number of samples per epoch; ``[i]`` for ANY i ≥ 0 is a LongTensor [seq_len + 1]: epoch
    ``i // len``, position ``i % len`` of that epoch's seeded permutation (or of file order with ``shuffle=False``).
    """

    def __init__(
        self,
        dataset: IndexedDataset,
        seq_len: int,
        seed: int,
        documents: range | None = None,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        documents = range(dataset.num_documents) if documents is None else documents
        if documents.step != 1:
            raise ValueError("documents must be a contiguous range")
        begin, end = dataset.document_token_range(documents.start, documents.stop)
        self.dataset, self.seq_len, self.seed, self.documents, self.shuffle = dataset, seq_len, seed, documents, shuffle
        self.tokens = dataset.tokens[begin:end]
        self.num_samples = (len(self.tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise ValueError(
                f"{dataset.prefix} (documents {documents.start}–{documents.stop}) has {len(self.tokens)} tokens, "
                f"fewer than one sample of seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len"
            )
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def __reduce__(self):
        # DataLoader workers under spawn receive a pickled copy: rebuild from the memory map, not from its bytes.
        return PackedSamples, (self.dataset, self.seq_len, self.seed, self.documents, self.shuffle)

    def __len__(self) -> int:
        return self.num_samples

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch ``epoch`` visits them (cached for the latest epoch asked)."""
        if self._order_epoch != epoch:
            # uint32 halves the memory of a Pile-sized epoch (~10^8 windows) and suffices below 2^32 windows.
            order = np.arange(self.num_samples, dtype=np.uint32 if self.num_samples < 2**32 else np.int64)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def window(self, i: int) -> int:
        """The window (0 … len−1, in file order) that global sample index ``i`` reads."""
        if i < 0:
            raise IndexError(f"sample indices are non-negative (a resume position), got {i}")
        epoch, position = divmod(i, self.num_samples)
        return int(self.epoch_order(epoch)[position])

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.window(int(i)) * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    def batch(self, indices: list[int]) -> torch.Tensor:
        """Samples ``indices`` stacked: LongTensor [len(indices), seq_len + 1]."""
        return torch.stack([self[i] for i in indices])


def sample_indices(step: int, global_batch: int, micro_batch: int, rank: int, world_size: int) -> list[list[int]]:
    """The global sample indices rank ``rank`` feeds in each gradient-accumulation micro-step of optimizer step
    ``step``, where global_batch = micro_batch × world_size × accumulation.

    Step ``step`` consumes samples [step·G, (step+1)·G), cut into G / micro_batch consecutive micro-batches;
    micro-batch m goes to rank m % world_size in its micro-step m // world_size. So micro-step j of all W ranks
    together is exactly micro-steps j·W … j·W+W−1 of one process accumulating A·W times, ranks never overlap,
    and the steps of an epoch cover every sample once.
    """
    if micro_batch < 1 or world_size < 1:
        raise ValueError(f"micro_batch and world_size must be positive, got {micro_batch}, {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    if global_batch < 1 or global_batch % (micro_batch * world_size):
        raise ValueError(
            f"global_batch={global_batch} must be a positive multiple of micro_batch × world_size = "
            f"{micro_batch} × {world_size}; change the batch sizes or the number of processes"
        )
    accumulation = global_batch // (micro_batch * world_size)
    first = step * global_batch
    return [
        list(range(first + m * micro_batch, first + (m + 1) * micro_batch))
        for m in (j * world_size + rank for j in range(accumulation))
    ]
