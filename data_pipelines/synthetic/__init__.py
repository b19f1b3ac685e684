"""The built-in synthetic benchmark (SPEC section 6): a cross-modality pedestrian set in the exact
SYSU-MM01 layout, with imitation vision-language-model captions that have a real VLM's gaps.

Real VI-ReID data sets are licensed and cannot be downloaded automatically; this generator gives
the project a benchmark that runs end to end on a laptop CPU, in the regime of real use: a
pretraining set of other identities (`purpose="pretrain"`) for a small CLIP, and a benchmark set.

  identities.py  who the people are: attribute vocabularies, one person's draw, id splits
  canvas.py      drawing primitives
  render.py      the per-image plan (view, distance, occluder) and the picture; what it shows
  captions.py    one-sentence captions naming a random subset of what the image shows, with errors
  oracle.py      the attribute-oracle Rank-1: the ceiling of a generated set
  writer.py      the SYSU-MM01 layout on disk, published atomically; the command line
"""
from data_pipelines.synthetic.captions import CaptionNoise, describe
from data_pipelines.synthetic.identities import (CAMERAS, COLOUR_WORDS, INFRARED_CAMERAS,
                                                  LOWER_NOUNS, UPPER_NOUNS, VAL_FRACTION,
                                                  VISIBLE_CAMERAS, Identity, assign_splits,
                                                  sample_identity)
from data_pipelines.synthetic.render import ImagePlan, Scene, image_plan, render_image, visible_parts
from data_pipelines.synthetic.writer import (CAPTION_TRUTH, DESCRIPTIONS, GENERATOR, MARKER, PURPOSES,
                                              SETTINGS_OFF_WHEN_ABSENT, VERSION, format_summary,
                                              generate, main)
