"""slimtrain.launch"""
