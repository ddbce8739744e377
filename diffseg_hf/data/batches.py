"""A deterministic, shardable, resumable stream of training batches for one process.

Map-style ``Dataset``: every image is decoded and resized once into a uint8 tensor (N, C, R, R); epoch e
visits ``randperm(N)`` seeded with ``seed + e`` in global batches of ``batch_size * num_processes``
(drop_last) and process r takes slice r of each. ``iterate(k)`` jumps straight to (epoch, offset): O(1).

``IterableDataset`` (streaming): ``split_dataset_by_node`` then ``shuffle(seed, buffer_size)`` and
``set_epoch(e)`` on each pass, read ``batch_size`` rows at a time (the last partial batch of a pass is
dropped). ``iterate(k)`` re-reads the first ``k * batch_size`` rows of this process's stream but neither
decodes nor resizes them: O(k) reads (tens of thousands of local rows a second; a Hub stream pays the
download again). Processes may see slightly different pass lengths; each still yields one batch per step.

Flips are drawn per (seed, step, process), so a resumed stream is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import numpy as np
import torch
from datasets import Dataset, Image, IterableDataset
from datasets.distributed import split_dataset_by_node

from diffseg_hf.data.transforms import images_to_uint8, random_hflip, uint8_to_float
from diffseg_hf.errors import DataError

# datasets >= 5 feeds the shuffle buffer from up to 10 shards at once through a thread pool that sleeps 5 s
# when each pass ends (apache/arrow#45214): it mixes better with many shards, and is switched off for one
_HAS_INPUT_SHARDS = "max_buffer_input_shards" in inspect.signature(IterableDataset.shuffle).parameters


def decode_dataset(dataset: Dataset, *, resolution: int, channels: int, chunk_size: int = 4096) -> torch.Tensor:
    """Every ``image`` of a map-style dataset -> uint8 (N, C, R, R), read in batched chunks."""
    if "image" not in dataset.column_names:
        raise DataError(f"the dataset has no 'image' column (columns: {', '.join(dataset.column_names)})")
    if isinstance(dataset.features["image"], Image):
        view = dataset.with_format(None, columns=["image"])  # PIL images, converted by PIL
    else:
        view = dataset.with_format("numpy", columns=["image"], dtype=np.uint8)  # (n, H, W[, C]) per chunk
    n = len(dataset)
    parts = [
        images_to_uint8(view[i : min(i + chunk_size, n)]["image"], resolution=resolution, channels=channels)
        for i in range(0, n, chunk_size)
    ]
    return torch.cat(parts) if parts else torch.empty(0, channels, resolution, resolution, dtype=torch.uint8)


def step_generator(seed: int, step: int, process_index: int) -> torch.Generator:
    """A generator seeded from (seed, step, process) through numpy's SeedSequence hash."""
    words = np.random.SeedSequence([seed, step, process_index]).generate_state(2)  # 2 x uint32
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


class TrainBatches:
    """Infinite float (B, C, R, R) batches in [-1, 1] for process ``process_index`` of ``num_processes``."""

    def __init__(
        self,
        dataset: Dataset | IterableDataset,
        *,
        resolution: int,
        channels: int,
        batch_size: int,
        seed: int,
        hflip: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
        max_images: int | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        assert batch_size > 0 and seed >= 0, f"batch_size={batch_size} must be > 0 and seed={seed} >= 0"
        assert 0 <= process_index < num_processes, f"process_index={process_index} not in [0, {num_processes})"
        self.resolution, self.channels, self.batch_size = resolution, channels, batch_size
        self.seed, self.hflip = seed, hflip
        self.process_index, self.num_processes = process_index, num_processes
        self.global_batch_size = batch_size * num_processes
        self._images: torch.Tensor | None = None
        self._stream: IterableDataset | None = None
        self._decoder: Image | None = None
        if isinstance(dataset, IterableDataset):
            self._stream = self._prepare_stream(dataset, max_images, shuffle_buffer)
        else:
            if max_images is not None:
                dataset = dataset.select(range(min(max_images, len(dataset))))
            self._images = decode_dataset(dataset, resolution=resolution, channels=channels)  # (N, C, R, R)
            if len(self._images) < self.global_batch_size:
                raise DataError(
                    f"the dataset has {len(self._images)} images, fewer than one global batch of "
                    f"{self.global_batch_size} (batch size {batch_size} x {num_processes} processes); "
                    "lower the batch size or add images"
                )

    @property
    def num_examples(self) -> int | None:
        """Images in the (map-style) dataset; None when streaming."""
        return None if self._images is None else len(self._images)

    @property
    def steps_per_epoch(self) -> int | None:
        """Full global batches per epoch; None when streaming."""
        return None if self._images is None else len(self._images) // self.global_batch_size

    def iterate(self, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Batches for steps start_step, start_step + 1, ... (infinite); identical to the tail of iterate(0)."""
        assert start_step >= 0, f"start_step={start_step} must be >= 0"
        return self._iterate_arrays(start_step) if self._images is not None else self._iterate_stream(start_step)

    def _finish(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """uint8 (B, C, R, R) -> float in [-1, 1], flipped per (seed, step, process) when hflip is on."""
        x = uint8_to_float(images)
        if self.hflip:
            x = random_hflip(x, step_generator(self.seed, step, self.process_index))
        return x

    def _iterate_arrays(self, start_step: int) -> Iterator[torch.Tensor]:
        images, spe, b = self._images, self.steps_per_epoch, self.batch_size
        lo = self.process_index * b  # this process's slice of each global batch
        step, epoch, order = start_step, None, None
        while True:
            e, offset = divmod(step, spe)
            if e != epoch:
                epoch, order = e, torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed + e))
            start = offset * self.global_batch_size + lo
            yield self._finish(images[order[start : start + b]], step)  # (B, C, R, R)
            step += 1

    def _prepare_stream(self, dataset: IterableDataset, max_images: int | None, buffer: int) -> IterableDataset:
        """take -> split by node -> shuffle; array columns read as numpy batches, Image columns stay
        undecoded until a batch is kept."""
        to_numpy = False
        if dataset.features is not None:
            if "image" not in dataset.features:
                raise DataError(f"the stream has no 'image' column (columns: {', '.join(dataset.features)})")
            dataset = dataset.select_columns(["image"])
            if isinstance(dataset.features["image"], Image):
                self._decoder = dataset.features["image"]
                dataset = dataset.decode(False)  # {"bytes", "path"} until a kept batch is decoded
            else:
                to_numpy = True  # Array2D/Array3D/lists: about 10x faster than python lists
        if max_images is not None:
            dataset = dataset.take(max_images)
        dataset = split_dataset_by_node(dataset, rank=self.process_index, world_size=self.num_processes)
        extra = {"max_buffer_input_shards": min(10, dataset.num_shards)} if _HAS_INPUT_SHARDS else {}
        dataset = dataset.shuffle(seed=self.seed, buffer_size=buffer, **extra)
        return dataset.with_format("numpy") if to_numpy else dataset

    def _iterate_stream(self, start_step: int) -> Iterator[torch.Tensor]:
        step, epoch = 0, 0
        while True:
            self._stream.set_epoch(epoch)
            batches_this_pass = 0
            for batch in self._stream.iter(batch_size=self.batch_size, drop_last_batch=True):
                if step >= start_step:  # earlier steps are read and dropped, never decoded
                    values = batch["image"]
                    if self._decoder is not None:
                        values = [self._decoder.decode_example(v) for v in values]
                    images = images_to_uint8(values, resolution=self.resolution, channels=self.channels)
                    yield self._finish(images, step)  # (B, C, R, R)
                step, batches_this_pass = step + 1, batches_this_pass + 1
            if batches_this_pass == 0:
                raise DataError(
                    f"process {self.process_index} of {self.num_processes} streams fewer than batch size "
                    f"{self.batch_size} images per pass; lower the batch size or add images"
                )
            epoch += 1
