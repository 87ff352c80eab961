//! (being written) RBAC that lets init-gates of opted-in namespaces read the state ConfigMap.
