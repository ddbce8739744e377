"""Self-contained modules that ship inside saved folders so that diffusers loads them without diffseg_hf:
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

Each file imports only torch and diffusers (never diffseg_hf) and is ALSO the implementation the toolkit
imports, so the shipped code and the tested code are the same file. `REMOTE_CLASSES` maps a class name to
the module file that defines it; `diffseg_hf.hub.write_remote_code` copies the files into a saved folder.
"""

from __future__ import annotations

from pathlib import Path

REMOTE_DIR = Path(__file__).parent

# class name -> module (file stem in this folder); components ship the file in their subfolder, the
# pipeline class at the folder root (diffusers' custom-component and custom-pipeline conventions)
REMOTE_CLASSES = {
    "DiffsegUNet2DModel": "diffseg_unet",
    "PixelEnsembleModel": "pixel_ensemble",
    "DiffsegSegmentationPipeline": "pipeline_diffseg_segmentation",
}
