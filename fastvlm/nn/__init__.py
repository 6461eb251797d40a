"""Drop-in nn.Modules built on fastvlm.ops."""
from fastvlm.nn.connector import FusedMLPConnector, MultiLevelConnector, ResamplerConnector

__all__ = ["FusedMLPConnector", "MultiLevelConnector", "ResamplerConnector"]
