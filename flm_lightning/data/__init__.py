from flm_lightning.data.datamodule import MixtureDataModule, TextDataModule
from flm_lightning.data.mixture import SourceSpec, TeacherSpec
from flm_lightning.data.prepare import prepare

__all__ = ["MixtureDataModule", "SourceSpec", "TeacherSpec", "TextDataModule", "prepare"]
