"""The fxgateway: gRPC and HTTP front ends over one invocation core and a backend of function replicas."""
