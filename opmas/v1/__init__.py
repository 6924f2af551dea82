"""Generated gRPC stubs of the OPMAS API (proto/opmas/v1). Regenerate with scripts/gen_proto.py."""
