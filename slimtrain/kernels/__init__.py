"""slimtrain.kernels"""
