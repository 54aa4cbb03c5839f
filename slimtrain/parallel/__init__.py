"""slimtrain.parallel"""
