"""The control plane: the control socket's server and its clients."""
