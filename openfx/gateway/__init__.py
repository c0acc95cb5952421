"""The fxgateway: gRPC and HTTP front ends over one invocation core and a backend of function replicas."""

import os

# The gateway forks watcher processes while gRPC threads run; fork handlers are not needed
# (children exec at once) and only print a warning per spawn.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
