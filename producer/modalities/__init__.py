"""One module per modality: raw file -> numpy array. No ring, no sockets, no Python loops over elements."""
