"""Where lorag keeps its files: one home folder, overridable by environment variables."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Locations shared by every lorag command. Each field reads `LORAG_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="LORAG_")

    home: Path = Field(
        default=Path("~/.cache/lorag"),
        description="Root of lorag's files: the model cache and the default data dir.",
    )
    data_dir: Path | None = Field(
        default=None,
        description="Daemon state (SQLite, FAISS files); defaults to <home>/data.",
    )

    @property
    def models_dir(self) -> Path:
        """The model cache: one folder per provisioned model."""
        return self.home.expanduser() / "models"

    @property
    def resolved_data_dir(self) -> Path:
        """The data dir, defaulted under home."""
        return (self.data_dir or self.home / "data").expanduser()
