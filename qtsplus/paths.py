"""Where the repository's shipped files are: the examples (captions, videos) and the DeepSpeed configs under infra/."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
