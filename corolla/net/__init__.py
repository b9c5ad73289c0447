"""The network layer: the only package that talks to hivemind (DHT, libp2p streams) and defines the wire format."""
