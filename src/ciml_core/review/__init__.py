"""Radiologist review: single-case reviews, review sessions over a dataset, their summary and
their way back into training.

- :mod:`ciml_core.review.record`: one reviewed case -> its mask (input affine, never over an
  input, refused atomically when it exists) and its line in ``reviews.jsonl``;
- :mod:`ciml_core.review.session`: :class:`ReviewSession`, a reviewer's pass over a dataset
  (worklist, statuses, resume, drafts, time per case);
- :mod:`ciml_core.review.summary`: ``ciml-core review-summary`` (CSV, Markdown, plot,
  inter-reader Dice);
- :mod:`ciml_core.review.export`: ``ciml-core review-export`` (accepted and corrected cases as
  a dataset in the input's layout).

Everything the widgets of :mod:`napari_ciml` do with reviews goes through these functions.
"""

from ciml_core.review.record import (
    DECISIONS,
    REJECT_REASONS,
    REVIEW_LOG,
    SESSION_DECISIONS,
    ReviewRecord,
    append_record,
    check_not_input,
    model_agreement,
    read_reviews,
    record_decision,
    reference_metrics,
    review_output_path,
    save_review,
    write_label_volume,
)
from ciml_core.review.session import (
    REVIEWED,
    SESSION_FILE,
    STATUSES,
    TODO,
    AlreadyReviewedError,
    Draft,
    ReviewCase,
    ReviewSession,
    SessionCase,
)

__all__ = [
    "DECISIONS",
    "REJECT_REASONS",
    "REVIEWED",
    "REVIEW_LOG",
    "SESSION_DECISIONS",
    "SESSION_FILE",
    "STATUSES",
    "TODO",
    "AlreadyReviewedError",
    "Draft",
    "ReviewCase",
    "ReviewRecord",
    "ReviewSession",
    "SessionCase",
    "append_record",
    "check_not_input",
    "model_agreement",
    "read_reviews",
    "record_decision",
    "reference_metrics",
    "review_output_path",
    "save_review",
    "write_label_volume",
]
