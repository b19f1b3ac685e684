"""The true attributes of a written synthetic set, as class indices: supervision and probe targets.

Read from the set's synthetic.json, so a set on disk is enough (the generator need not run again).
"""
from __future__ import annotations

import json
import os

from data_pipelines.synthetic.identities import SHARED_ATTRIBUTES
from data_pipelines.synthetic.writer import MARKER


def attribute_table(root: str, attributes: tuple[str, ...] = SHARED_ATTRIBUTES
                    ) -> tuple[dict[int, list[int]], list[list[str]]]:
  """(pid -> value index per attribute, the sorted values of each attribute present in the set)."""
  path = os.path.join(root, MARKER)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found; the folder must be a set written by "
                            "`python -m data_pipelines.synthetic`")
  with open(path) as f:
    people = json.load(f)["identities"]
  values = [sorted({str(p[a]) for p in people}) for a in attributes]
  table = {int(p["pid"]): [values[k].index(str(p[a])) for k, a in enumerate(attributes)]
           for p in people}
  return table, values


def pid_of(path: str) -> int:
  """The identity of an image path of the SYSU-MM01 layout (camN/PPPP/NNNN.jpg)."""
  return int(os.path.basename(os.path.dirname(path)))
