"""Generated from proto/homenet/v1 by tools/gen_proto.py; do not edit."""
