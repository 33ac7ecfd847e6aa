"""Model definitions: plain math over injected tensor-parallel linears."""

from megaret.models.retnet import RetNet, RetNetOutput, RetNetState

__all__ = ["RetNet", "RetNetOutput", "RetNetState"]
