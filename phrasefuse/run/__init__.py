"""The whole pipeline from one TOML file (`phrasefuse run`) and the self-made demo (`phrasefuse demo`)."""

from phrasefuse.run.config import Config, load_config
from phrasefuse.run.pipeline import StageResult, run_config

__all__ = ["Config", "StageResult", "load_config", "run_config"]
