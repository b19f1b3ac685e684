"""Quality flags of a generated description (SPEC section 4): flagged, never dropped.

A vision-language model sometimes answers with nothing, or echoes its instruction instead of
describing the person; such records stay in the file (the image was seen) with a flag so the
trainer or a person can filter them.
"""
from __future__ import annotations

import re
from typing import Callable

EXCEEDS = "exceeds_77_tokens"
EMPTY = "empty"
REPEATS_PROMPT = "repeats_prompt"

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
  """Lower-case words, punctuation dropped (the unit the echo check compares)."""
  return _WORD.findall(text.lower())


def repeats_prompt(output: str, prompt: str, window: int = 8) -> bool:
  """True when `output` contains a run of `window` consecutive prompt words (all of a shorter prompt).

  `prompt` may hold a "{description}" placeholder (the rewrite prompt): only its instruction parts
  count, so a rewrite that faithfully repeats the description is not flagged.
  """
  out = " " + " ".join(words(output)) + " "
  for part in prompt.split("{description}"):
    w = words(part)
    n = min(window, len(w))
    if n == 0:
      continue
    for i in range(len(w) - n + 1):
      if " " + " ".join(w[i:i + n]) + " " in out:
        return True
  return False


def flags_for(description: str, prompt: str, rewritten: str | None, rewrite_prompt: str | None,
              count_tokens: Callable[[str], int], max_tokens: int, window: int) -> list[str]:
  """Flags of one record, in a fixed order.

  exceeds_77_tokens: the text the trainer reads (the rewrite when there is one, else the
    description) is longer than `max_tokens` CLIP tokens, markers included.
  empty: the description, or the rewrite, is empty after stripping.
  repeats_prompt: the description echoes the vision-language prompt, or the rewrite echoes the
    rewrite instruction.
  """
  flags = []
  used = rewritten if rewritten is not None else description
  if count_tokens(used) > max_tokens:
    flags.append(EXCEEDS)
  if not description.strip() or (rewritten is not None and not rewritten.strip()):
    flags.append(EMPTY)
  if repeats_prompt(description, prompt, window) or (
      rewritten is not None and rewrite_prompt is not None
      and repeats_prompt(rewritten, rewrite_prompt, window)):
    flags.append(REPEATS_PROMPT)
  return flags
