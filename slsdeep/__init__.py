"""SLSDeep: skin-lesion segmentation (Sarker et al., MICCAI 2018) built on slsdeep_kernels."""
