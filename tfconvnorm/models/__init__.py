"""Models and input pipelines of the experiments: the CIFAR ResNet V2, networks
Lipschitz by construction, the ImageNet ResNet V2 name maps, and the TFDS /
digits input pipelines.

Not imported by `tfconvnorm` itself (TFDS is optional); `train`, `analyze` and the
checkpoint readers that rebuild architectures import it.
"""

from tfconvnorm.models.cifar_input import DATASETS
from tfconvnorm.models.cifar_input import DataUnavailableError
from tfconvnorm.models.cifar_input import DatasetInfo
from tfconvnorm.models.cifar_input import build_dataset
from tfconvnorm.models.cifar_input import dataset_info
from tfconvnorm.models.cifar_input import load_split
from tfconvnorm.models.cifar_input import preprocess_image
from tfconvnorm.models.lipschitz_nets import MaxMin
from tfconvnorm.models.lipschitz_nets import lipschitz_convnet
from tfconvnorm.models.lipschitz_nets import lipschitz_resnet
from tfconvnorm.models.resnet_v2 import cifar_resnet_v2
from tfconvnorm.models.resnet_v2 import resnet_v2_block_config
