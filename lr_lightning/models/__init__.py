"""Models (pure torch; ``llama``'s builders import ``transformers`` when called)."""

from lr_lightning.models.gcn import GCN
from lr_lightning.models.gpt import GPT, GPT_SIZES, GPTConfig
from lr_lightning.models.hyperbolic import HyboNet, LorentzGraphConvolution, LorentzLinear
from lr_lightning.models.image import IMAGE_ARCHITECTURES, build_image_model
from lr_lightning.models.lenet import LeNet5
from lr_lightning.models.llama import LLAMA_SIZES, build_causal_lm, llama_config, load_hf_config
from lr_lightning.models.resnet import ResNet
from lr_lightning.models.vgg import VGG

__all__ = ["GPT", "GPTConfig", "GPT_SIZES", "GCN", "HyboNet", "LorentzLinear", "LorentzGraphConvolution",
           "IMAGE_ARCHITECTURES", "build_image_model", "LeNet5", "VGG", "ResNet", "LLAMA_SIZES", "llama_config",
           "load_hf_config", "build_causal_lm"]
