"""Self-contained modules that ship inside saved folders so that diffusers loads them without diffseg_hf:
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

Each file imports only torch and diffusers (never diffseg_hf) and is ALSO the implementation the toolkit
imports, so the shipped code and the tested code are the same file. `REMOTE_CLASSES` maps a class name to
the module file that defines it; `write_remote_code` copies the files into a saved folder.
This package never imports diffseg_hf: it is what a saved folder runs without the toolkit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REMOTE_DIR = Path(__file__).parent

# class name -> module (file stem in this folder); components ship the file in their subfolder, the
# pipeline class at the folder root (diffusers' custom-component and custom-pipeline conventions)
REMOTE_CLASSES = {
    "DiffsegUNet2DModel": "diffseg_unet",
    "PixelEnsembleModel": "pixel_ensemble",
    "ConvReadoutModel": "pixel_ensemble",
    "DiffsegSegmentationPipeline": "pipeline_diffseg_segmentation",
}


def write_remote_code(folder: str | os.PathLike, *, dry_run: bool = False) -> list[Path]:
    """Ship the `diffseg_hf.remote` file of every custom class named in model_index.json and point the entry
    at it; idempotent (also upgrades folders saved before remote code existed). Returns the relative paths
    written (or that would be written)."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    changes: dict[Path, Path] = {}
    for key, value in index.items():
        class_name = value[-1] if isinstance(value, list) and value else value
        module = REMOTE_CLASSES.get(class_name) if isinstance(class_name, str) else None
        if module is None or (key != "_class_name" and not isinstance(value, list)):
            continue
        target = Path(f"{module}.py") if key == "_class_name" else Path(key) / f"{module}.py"
        source = REMOTE_DIR / f"{module}.py"
        if not (folder / target).is_file() or (folder / target).read_bytes() != source.read_bytes():
            changes[target] = source
        index[key] = [module, class_name]
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    if json.loads(index_path.read_text()) != index:
        changes[Path("model_index.json")] = index_path
    if not dry_run:
        for target, source in changes.items():
            if target.name == "model_index.json":
                index_path.write_text(text)
            else:
                shutil.copyfile(source, folder / target)
    return sorted(changes)
