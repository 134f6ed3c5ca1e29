"""fgl-retinanet: focal loss vs focal gradient loss on keras-retinanet."""

__version__ = "0.1.0"
