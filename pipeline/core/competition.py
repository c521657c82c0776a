"""The fisheries competition's fixed facts: its classes, file names, submission header, stage-2 prefix, and
the names of the community's box files.

Everything here is what Kaggle decided, not a setting: it never goes into params.yaml, and every module that
needs one of these names imports it from here rather than spelling it again.
"""

from __future__ import annotations

COMPETITION = "the-nature-conservancy-fisheries-monitoring"
COMPETITION_URL = f"https://www.kaggle.com/competitions/{COMPETITION}"

#: Kaggle's column order for the fisheries submission; the order of every probability array in the project.
FISH_CLASSES: tuple[str, ...] = ("ALB", "BET", "DOL", "LAG", "NoF", "OTHER", "SHARK", "YFT")
#: The submission header, in this order.
SUBMISSION_HEADER: tuple[str, ...] = ("image", *FISH_CLASSES)

#: The download's image folders: training images by class, then the two test stages.
SPLITS: tuple[str, ...] = ("train", "test_stg1", "test_stg2")
SAMPLE_SUBMISSIONS: tuple[str, ...] = ("sample_submission_stg1.csv", "sample_submission_stg2.csv")
#: Stage-2 rows of a submission (and stage-2 manifest ids) carry their folder: `test_stg2/image_00001.jpg`.
STAGE2_PREFIX = "test_stg2/"


#: The community's box annotations (not Kaggle's files, but as fixed): one Sloth JSON file per class with
#: fish, named by the class in lower case; NoF has none, since a frame without fish has nothing to box.
ANNOTATION_FILES: dict[str, str] = {c: f"{c.lower()}_labels.json" for c in FISH_CLASSES if c != "NoF"}


def class_index(label: str) -> int:
    """The column of `label` in every probability array; a clear error for a label that is not a class."""
    try:
        return FISH_CLASSES.index(label)
    except ValueError:
        raise ValueError(f"unknown class {label!r}; the classes are {list(FISH_CLASSES)}") from None
