"""cnnrnn: how CNNs and LSTMs read Fashion-MNIST, and a CNN+LSTM that names every item in a picture."""

__version__ = "0.1.0"
