"""Image data for DDPM training: named sources, torchvision-free transforms, resumable sharded batches."""

from diffseg_hf.data.batches import TrainBatches, decode_dataset
from diffseg_hf.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_SOURCES,
    arrays_to_dataset,
    load_fashion_mnist_arrays,
    load_idx_arrays,
    load_images,
    read_idx,
    resolve_voc_root,
    source_choices,
    voc_image_ids,
)
from diffseg_hf.data.transforms import images_to_tensor, images_to_uint8, random_hflip, to_uint8, uint8_to_float

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_SOURCES",
    "TrainBatches",
    "arrays_to_dataset",
    "decode_dataset",
    "images_to_tensor",
    "images_to_uint8",
    "load_fashion_mnist_arrays",
    "load_idx_arrays",
    "load_images",
    "random_hflip",
    "read_idx",
    "resolve_voc_root",
    "source_choices",
    "to_uint8",
    "uint8_to_float",
    "voc_image_ids",
]
