"""Models and input pipelines for the experiments (not part of the installed library)."""

from models.cifar_input import DATASETS
from models.cifar_input import DataUnavailableError
from models.cifar_input import DatasetInfo
from models.cifar_input import build_dataset
from models.cifar_input import dataset_info
from models.cifar_input import load_split
from models.cifar_input import preprocess_image
from models.resnet_v2 import cifar_resnet_v2
from models.resnet_v2 import resnet_v2_block_config
