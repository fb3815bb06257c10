"""qtsplus: query-aware visual-token selection for long-video LLMs, and the pipeline that distils it."""

__version__ = "0.1.0"
