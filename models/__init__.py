"""The experiments' models, for code that imports them as `models` from a checkout.

The code lives in `tfconvnorm.models` (installed with the package, so that the
command-line tools work from `pip install`); this package only makes
`models.resnet_v2`, `models.imagenet_resnet_v2` and `models.cifar_input` the very
same module objects, so nothing is duplicated and patching one patches both.
It is not installed: a top-level `models` in site-packages would clash.
"""

import sys

from tfconvnorm import models as _models
from tfconvnorm.models import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
from tfconvnorm.models import cifar_input, imagenet_resnet_v2, resnet_v2

for _module in (cifar_input, imagenet_resnet_v2, resnet_v2):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[-1]}"] = _module
__all__ = [name for name in dir(_models) if not name.startswith("_")]
