"""Kubernetes manifests for cluster mode, rendered from the same function definitions the
embedded platform runs (`openfx-cli k8s render`, and the gateway's Kubernetes backend)."""
