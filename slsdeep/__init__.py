"""SLSDeep: skin-lesion segmentation (Sarker et al., MICCAI 2018) built on slsdeep_kernels."""

from slsdeep.data import ISICDataset, synthesize
from slsdeep.evaluate import isic_scores

from slsdeep.model import SLSDeep, load_imagenet_weights

__all__ = ["ISICDataset", "SLSDeep", "isic_scores", "load_imagenet_weights", "synthesize"]
