"""diffseg-hf: DDPMs on Hugging Face diffusers and label-efficient segmentation from their decoder features."""

__version__ = "0.1.0"
