"""Description generation (SPEC section 4): prompts and generation settings of eees_jax.describe.

  python -m eees_jax.describe --dataset=sysu --root=data/SYSU-MM01 --out=data/SYSU-MM01/descriptions.jsonl \
      --model=llava-hf/llava-1.5-7b-hf [--rewrite_model=Qwen/Qwen2.5-7B-Instruct] [--config.batch_size=16]

Every value is recorded in each output record (prompts, model names, decoding settings), and a
resumed run must use the same ones: change them only for a new output file.
"""
import ml_collections

_ATTRIBUTES = ("gender, hair, upper-body clothing, lower-body clothing, shoes, and any bag or other "
               "belongings")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 8            # images per generate() call (memory: docs/describe.md)
  c.dtype = "auto"            # auto (float16 on a GPU, float32 on CPU) | float32 | float16 | bfloat16
  c.seed = 0                  # torch seed; matters only when generation.do_sample
  c.regdb_splits = tuple(range(1, 11))   # RegDB: union of these splits' images (one file for all)
  c.max_clip_tokens = 77      # CLIP's context; longer texts get the "exceeds_77_tokens" flag
  c.clip_tokenizer = ""       # counts those tokens: "" clip-anytorch's BPE, or a HF CLIP folder
  c.echo_window = 8           # this many consecutive prompt words in an answer: "repeats_prompt"

  # Visible images show colour; infrared (thermal) images do not, so that prompt asks for shape and
  # texture only: a guessed colour is a wrong label the cross-modality terms would have to undo.
  c.prompts = ml_collections.ConfigDict(dict(
      visible=("Describe the pedestrian in this image in one or two sentences: their "
               f"{_ATTRIBUTES}, with colours. Describe only the person, not the background."),
      infrared=("This is an infrared surveillance image, so colours are not visible. Describe the "
                f"pedestrian in one or two sentences: their {_ATTRIBUTES}, by shape, length and "
                "texture. Do not guess or mention any colour. Describe only the person, not the "
                "background."),
  ))

  c.generation = ml_collections.ConfigDict(dict(
      max_new_tokens=96, do_sample=False, num_beams=1, temperature=0.2, top_p=0.9,
      repetition_penalty=1.0,
  ))

  # Optional second stage (--rewrite_model): a text-only instruction model turns each description
  # into one sentence in a fixed attribute order that fits CLIP's 77 tokens.
  c.rewrite = ml_collections.ConfigDict(dict(
      prompt=("Rewrite this description of a pedestrian as one sentence of at most 45 words that "
              "mentions, in this order: gender, hair, upper clothing, lower clothing, shoes, "
              "belongings. Leave out what the description does not mention and add nothing. "
              "Answer with the sentence only.\n\nDescription: {description}"),
      use_chat_template=True,   # wrap the prompt in the model's chat format (instruction models)
      batch_size=32,
      generation=dict(max_new_tokens=80, do_sample=False, num_beams=1, temperature=0.2, top_p=0.9,
                      repetition_penalty=1.0),
  ))
  return c
