"""The ceiling of a generated set: Rank-1 of oracles that know each identity's attributes.

The attribute oracle knows, for every test identity, the attributes an infrared image can show
(identities.INFRARED_ATTRIBUTES: shapes and each fabric's heat, no colour). For an infrared query
it ranks first the gallery identities whose attributes equal the query's, in random order; its
expected Rank-1 is therefore 1 / (number of gallery identities sharing the query's attributes).
The cross-modal oracle does the same with identities.SHARED_ATTRIBUTES, what a visible gallery
image can show too (materials are invisible in colour): the tighter ceiling for a model that
compares an infrared query with visible images.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from data_pipelines.synthetic.identities import INFRARED_ATTRIBUTES, INFRARED_CAMERAS, Identity

GALLERY_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}  # SYSU-MM01 search modes


def expected_rank1(identities: Sequence[Identity], images_per_camera: int, split: str = "test",
                   mode: str = "all", attributes: tuple[str, ...] = INFRARED_ATTRIBUTES) -> float:
  """Expected Rank-1 (percent) of the oracle knowing `attributes`, over the infrared queries of `split`.

  Every infrared image of the split is a query (weighted equally); queries whose identity is
  absent from the mode's gallery cameras are skipped, as the protocol skips them.
  """
  people = [i for i in identities if i.split == split]
  gallery = [i for i in people if set(i.cameras) & set(GALLERY_CAMERAS[mode])]
  groups = Counter(i.signature(attributes) for i in gallery)
  in_gallery = {i.pid for i in gallery}
  total, hits = 0, 0.0
  for person in people:
    if person.pid not in in_gallery:
      continue
    queries = images_per_camera * sum(1 for c in person.cameras if c in INFRARED_CAMERAS)
    total += queries
    hits += queries / groups[person.signature(attributes)]
  return 100.0 * hits / total if total else 0.0


def distinct_signatures(identities: Sequence[Identity], split: str = "test",
                        attributes: tuple[str, ...] = INFRARED_ATTRIBUTES) -> tuple[int, int]:
  """(identities of `split`, how many of them no other identity of the split shares attributes with)."""
  people = [i for i in identities if i.split == split]
  groups = Counter(i.signature(attributes) for i in people)
  return len(people), sum(1 for i in people if groups[i.signature(attributes)] == 1)
