"""Repository hygiene: the folders the docs tell people to fill stay out of git."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ignored(path: str) -> bool:
  return subprocess.run(["git", "-C", ROOT, "check-ignore", "-q", "--no-index", path]).returncode == 0


@pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
                    reason="not a git checkout")
def test_weights_and_models_folders_are_ignored_but_model_code_is_not():
  assert _ignored("weights/RN50/clip.safetensors")            # README: convert_clip output
  assert _ignored("models/llava-1.5-7b-hf/config.json")       # docs/describe.md: hf download
  assert not _ignored("eees_jax/models/eees.py")
  assert not _ignored("eees_jax/models/new_tower.py")
  assert not _ignored("eees_jax/weights/openai.py")
