"""SLSDeep: skin-lesion segmentation (Sarker et al., MICCAI 2018) built on slsdeep_kernels."""

from slsdeep.data import ISICDataset, synthesize
from slsdeep.evaluate import isic_scores

__all__ = ["ISICDataset", "isic_scores", "synthesize"]

from slsdeep.model import SLSDeep, load_imagenet_weights

__all__ = ["SLSDeep", "load_imagenet_weights"]
