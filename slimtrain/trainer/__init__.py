"""slimtrain.trainer"""
