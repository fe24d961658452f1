from .base import Model
from .hourglass import Hourglass
from .unet import Unet

ARCHITECTURES = {"hourglass": Hourglass, "unet": Unet}

__all__ = ["Model", "Hourglass", "Unet", "ARCHITECTURES"]
