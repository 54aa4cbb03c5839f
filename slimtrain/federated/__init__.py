"""slimtrain.federated"""
