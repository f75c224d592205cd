"""pdserve protobuf packages, one subpackage per API version."""
