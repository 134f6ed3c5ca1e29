"""Where the shared material lives: FGL_SHARED_DIR, else ../shared next to the repository."""

import os
from pathlib import Path

SHARED_DIR = Path(
    os.environ.get("FGL_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared")
)
VOC_SAMPLE = SHARED_DIR / "data" / "voc2007_sample" / "VOCdevkit" / "VOC2007"
