"""Generated from proto/crossgrad/v1 by scripts/generate_proto.py. Do not edit."""
