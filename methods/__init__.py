"""Self-supervised methods as pure PyTorch + timm modules (no Ray, no MLflow, no boto3).

Use :func:`methods.build_method` with a spec's ``method.name`` and keyword arguments named as in the seeds.
"""

from methods.base import MethodOutput, SSLMethod
from methods.registry import BUILTIN_METHODS, available_methods, build_method, get_method_class

__all__ = ["MethodOutput", "SSLMethod", "available_methods", "build_method", "get_method_class", "BUILTIN_METHODS"]
