"""Extract: encoders (one registry of spec strings; `recorded.py` reloads the one a folder
records), and the batch jobs that embed every image and text of a manifest once, into
embedding stores.

Nothing heavy is imported here, so the CLI's --help stays instant.
"""

# Offline defaults: weights from installed packages (no model hub at run time).
DEFAULT_IMAGE_MODEL = "builtin:efficientnet-lite0"
DEFAULT_TEXT_MODEL = "builtin:all-minilm-l6-v2"
