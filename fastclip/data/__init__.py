"""Image-caption datasets for CLIP training and zero-shot evaluation.

Every dataset yields ``(image, caption)``: a uint8 RGB tensor (3, H, W) and a str. The training
loop applies ``fastclip.transforms.ImageTransform`` and the tokenizer itself.

- ``ShapesDataset`` (``shapes``): generated coloured shapes and their spatial relations (no
  download). Splits "train", "test" (retrieval), "zeroshot" (seen colour-shape pairs) and
  "compositional" (``HELD_OUT`` pairs, never drawn in training).
- ``DigitsDataset`` (``digits``): scikit-learn's 1,797 handwritten 8x8 digits (no download).
- ``WebDatasetPairs`` / ``write_shards`` (``shards``): img2dataset-style tar shards (``key.jpg`` +
  ``key.txt``).
- ``CsvPairs`` (``imagefiles``): a CSV of image paths and captions.
- ``HfPairs`` (``hf``): a Hugging Face ``datasets`` dataset's image and caption columns.
- ``SOURCES`` (``sources``): the registry of what ``--data`` names, for training, evaluation and
  fine-tuning alike.

Bad samples never crash training: shards skip them, ``CsvPairs`` and ``HfPairs`` return None
for them and ``collate_pairs`` drops the Nones. All count them in ``skipped`` (by reason in
``skip_reasons``) and warn. With DataLoader workers, each worker counts its own.
"""

from fastclip.data.digits import (
    DIGIT_CAPTIONS,
    DIGIT_CLASSNAMES,
    DIGIT_TEMPLATES,
    DIGIT_WORDS,
    DigitsDataset,
)
from fastclip.data.hf import HfPairs
from fastclip.data.imagefiles import CsvPairs, collate_pairs, decode_image
from fastclip.data.shapes import (
    CAPTIONS,
    CLASSNAMES,
    COLOURS,
    HELD_OUT,
    PAIRS,
    RELATIONS,
    SHAPES,
    SPLITS,
    TEMPLATES,
    ShapesDataset,
)
from fastclip.data.shards import IMAGE_EXTENSIONS, WebDatasetPairs, write_shards
from fastclip.data.sources import (
    SOURCES,
    EvaluationSets,
    Source,
    column_keywords,
    described,
    evaluation_sets,
    few_shot_splits,
    find,
    serving,
    training_set,
)

__all__ = [
    "CAPTIONS",
    "CLASSNAMES",
    "COLOURS",
    "DIGIT_CAPTIONS",
    "DIGIT_CLASSNAMES",
    "DIGIT_TEMPLATES",
    "DIGIT_WORDS",
    "HELD_OUT",
    "IMAGE_EXTENSIONS",
    "PAIRS",
    "RELATIONS",
    "SHAPES",
    "SOURCES",
    "SPLITS",
    "TEMPLATES",
    "CsvPairs",
    "DigitsDataset",
    "EvaluationSets",
    "HfPairs",
    "ShapesDataset",
    "Source",
    "WebDatasetPairs",
    "collate_pairs",
    "column_keywords",
    "decode_image",
    "described",
    "evaluation_sets",
    "few_shot_splits",
    "find",
    "serving",
    "training_set",
    "write_shards",
]
