"""What opmasd and its clients share: the opmas.v1 gRPC stubs and the rules both sides follow."""
